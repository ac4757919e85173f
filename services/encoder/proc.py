"""Encoder process (vLLM v1's ``EngineCoreProc`` side): messages → :class:`EncodeEngine` →
messages and feature-cache records.

Loop steps: receive (EncodeRequest → engine, AbortRequest) ▸ engine step (one batch of queued
images; pool hits answered at once) ▸ unpublish evicted entries ▸ publish + FeaturesReady to
the prefill instance ▸ RequestFailed (+ AbortRequest to prefill).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from epd.config import EncoderConfig
from epd.device import torch_dtype
from epd.models.qwen2_vl import Qwen2VLAdapter, role_parts
from epd.registry.registry import RegistryError
from epd.service import ServiceProc
from epd.wire.gen import epd_pb2 as pb
from services.encoder import convert
from services.encoder.engine import EncodeEngine
from services.encoder.records import EncodeOutputs, EncodeRequest

logger = logging.getLogger(__name__)


class EncoderProc(ServiceProc):
    def __init__(self, config: EncoderConfig, adapter: Qwen2VLAdapter | None = None) -> None:
        super().__init__(config, "encoder", config.feature_pool_mb << 20)
        self.cfg = config
        self.adapter = adapter or Qwen2VLAdapter.load(
            config.model, dtype=torch_dtype(config.dtype), parts=role_parts("encoder"),
            batch_invariant=config.batch_invariant,
        )
        self.engine = EncodeEngine(self.adapter, self.region.tensor, config.encoder_max_images,
                                   config.encoder_max_patches)
        # Requests this encoder still answers for: queued, or FeaturesReady sent and not yet
        # certain to be delivered (request id -> (request, monotonic expiry)).
        self.active: dict[str, tuple[EncodeRequest, float]] = {}

    def handlers(self):
        return {"encode_request": self.on_encode_request, "abort_request": self.on_abort}

    def capacity(self):
        return {"feature_pool_bytes": self.region.nbytes}

    def load(self):
        return asdict(self.engine.load())

    def inflight(self) -> int:
        return self.engine.load().inflight

    # -- handlers ----------------------------------------------------------------------
    def on_encode_request(self, env, msg: pb.EncodeRequest, blobs: list[bytes]) -> None:
        req = convert.request_from_proto(msg, blobs, time.time() + self.cfg.request_timeout_s)
        self.active[req.request_id] = (req, time.monotonic() + self.cfg.request_timeout_s)
        self.track(req.request_id, ids=(env.sender, msg.prefill_instance))
        self.engine.add(req)

    def on_abort(self, env, msg: pb.AbortRequest, blobs) -> None:
        self.engine.abort(msg.request_id)
        self.active.pop(msg.request_id, None)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.active

    def drop_request(self, request_id: str, code: int, reason: str, peer: str = "") -> None:
        req, _ = self.active.pop(request_id, (None, 0.0))
        if req is not None:
            self.engine.fail(req, convert.code_name(code), reason, peer=peer)
            self._emit(self.engine.take_outputs())

    def on_step_error(self, exc: Exception) -> None:
        self._emit(self.engine.fail_step(exc))

    def fail_all(self, reason: str) -> None:
        self._emit(self.engine.fail_all("UNAVAILABLE", reason))

    # -- step --------------------------------------------------------------------------
    def step(self) -> bool:
        mono = time.monotonic()
        for rid in [r for r, (_, until) in self.active.items() if until < mono]:
            del self.active[rid]
        out = self.engine.step()
        self._emit(out)
        return out.busy

    def _emit(self, out: EncodeOutputs) -> None:
        for mm_hash in out.evicted:  # before publishing: an evicted hash may be re-pooled in the same step
            try:
                self.registry.delete_feature(mm_hash, holder=self.instance_id)
            except RegistryError as exc:
                logger.warning("feature %s not unpublished: %s", mm_hash[:12], exc)
        for ready in out.ready:
            req, route = ready.request, ready.request.ctx
            try:  # refresh (or restore) the entry's TTL on a hit
                self.registry.put_feature(ready.entry.mm_hash, convert.feature_entry(
                    ready.entry, self.instance_id, self.region.handle), self.cfg.feature_ttl_s)
            except RegistryError as exc:  # the cache is an optimisation; the request goes on
                logger.warning("feature %s not published: %s", ready.entry.mm_hash[:12], exc)
            self.send(route.prefill_inbox, convert.features_ready(ready, self.instance_id, self.region.handle))
            if req.request_id in self.active and not self.engine.has_queued(req.request_id):
                # Every image answered: keep answering for it only until delivery is certain.
                self.active[req.request_id] = (req, time.monotonic() + self.cfg.send_timeout_s + 1)
        for failure in out.failed:
            req, route = failure.request, failure.request.ctx
            self.active.pop(req.request_id, None)
            self.fail(route.reply_to, req.request_id, convert.error_code(failure), failure.message, peer=failure.peer)
            if failure.peer not in (route.prefill_instance, route.prefill_inbox):
                self.send(route.prefill_inbox, pb.AbortRequest(request_id=req.request_id, reason=failure.message))
