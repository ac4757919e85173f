"""Prefill process (vLLM v1's ``EngineCoreProc`` side): messages → :class:`PrefillEngine` →
messages. Features arrive by asynchronous one-sided READ, the first token goes to the gateway,
the KV goes to decode by one-sided WRITE, layer group by layer group.

Loop steps: receive (PrefillRequest → engine + KvAllocRequest to decode, FeaturesReady →
prefetch, KvAllocated → blocks known, RequestFailed, AbortRequest) ▸ engine step ▸ send
TokenDelta, KvReady, AbortRequest (blocks not needed) and RequestFailed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from epd.config import PrefillConfig
from epd.device import torch_dtype
from epd.engine.region_alloc import RangeAllocator
from epd.engine.tombstones import Tombstones
from epd.models.qwen2_vl import Qwen2VLAdapter, role_parts
from epd.service import ServiceProc
from epd.wire.gen import epd_pb2 as pb
from services.prefill import convert
from services.prefill.engine import ORPHAN_TTL_S, PrefillEngine
from services.prefill.feature_reader import OneSidedFeatureReader
from services.prefill.kv_sender import KvSender
from services.prefill.records import PrefillOutputs, PrefillRequest

logger = logging.getLogger(__name__)


class PrefillProc(ServiceProc):
    def __init__(self, config: PrefillConfig, adapter: Qwen2VLAdapter | None = None) -> None:
        super().__init__(config, "prefill", config.prefill_buffer_mb << 20)
        self.cfg = config
        self.adapter = adapter or Qwen2VLAdapter.load(
            config.model, dtype=torch_dtype(config.dtype), parts=role_parts("prefill"),
            batch_invariant=config.batch_invariant,
        )
        self.staging = RangeAllocator(self.region.nbytes)  # feature reads and KV staging share it
        self.engine = PrefillEngine(
            self.adapter,
            KvSender(self.transfer, self.region, self.staging, self.adapter.num_layers, config.kv_layer_group),
            OneSidedFeatureReader(self.transfer, self.region, self.staging),
            config.prefill_max_tokens, staging=self.staging,
        )
        self.aborted = Tombstones(ttl_s=ORPHAN_TTL_S)  # aborts that may overtake their request's messages
        # KvReady sent, delivery not yet certain: request id -> (request, monotonic expiry)
        self.handed_off: dict[str, tuple[PrefillRequest, float]] = {}

    def handlers(self):
        return {
            "prefill_request": self.on_prefill_request,
            "features_ready": self.on_features_ready,
            "kv_allocated": self.on_kv_allocated,
            "request_failed": self.on_request_failed,
            "abort_request": self.on_abort,
        }

    def load(self):
        return asdict(self.engine.load())

    def inflight(self) -> int:
        return self.engine.load().inflight

    # -- handlers ----------------------------------------------------------------------
    def on_prefill_request(self, env, msg: pb.PrefillRequest, blobs) -> None:
        if msg.request_id in self.aborted:  # its AbortRequest overtook it
            logger.info("request %s: arrived after its abort, dropped", msg.request_id)
            return
        req = convert.request_from_proto(msg, time.time() + self.cfg.request_timeout_s)
        self.engine.add(req)
        self.track(req.request_id, ids=(env.sender, msg.decode_instance))
        # Reserve decode blocks now, before computing (receivers allocate, senders write).
        self.send(msg.decode_inbox, convert.kv_alloc_request(req, self.inbox.address))

    def on_features_ready(self, env, msg: pb.FeaturesReady, blobs) -> None:
        if msg.request_id not in self.aborted:
            self.engine.add_features(msg.request_id, convert.feature_ref_from_proto(msg))

    def on_kv_allocated(self, env, msg: pb.KvAllocated, blobs) -> None:
        # an unknown request is already gone: decode frees on its AbortRequest or timeout
        self.engine.set_kv_target(msg.request_id, convert.kv_target_from_proto(msg))

    def on_request_failed(self, env, msg: pb.RequestFailed, blobs) -> None:
        req = self.engine.request(msg.request_id)
        if req is not None:  # decode failed it: its blocks are already free
            self.engine.abort(msg.request_id)
            self._send_failure(req, msg.code, f"{msg.stage}: {msg.message}", release_decode=False)

    def on_abort(self, env, msg: pb.AbortRequest, blobs) -> None:
        self.handed_off.pop(msg.request_id, None)
        self.aborted.add(msg.request_id)
        req = self.engine.request(msg.request_id)
        self.engine.abort(msg.request_id)
        if req is not None:
            self.send(req.ctx.decode_inbox, pb.AbortRequest(request_id=msg.request_id, reason=msg.reason))

    # -- step --------------------------------------------------------------------------
    def step(self) -> bool:
        mono = time.monotonic()
        for rid in [r for r, (_, until) in self.handed_off.items() if until < mono]:
            del self.handed_off[rid]
        out = self.engine.step()
        self._emit(out)
        return out.busy

    def _emit(self, out: PrefillOutputs) -> None:
        for first in out.first_tokens:
            self.send(first.request.ctx.reply_to, convert.token_delta(first))
        for handoff in out.handoffs:
            req = handoff.request
            # Until the hand-off is delivered the request is still ours: a decode found dead
            # meanwhile fails it here (the gateway migrates it) instead of after a whole TTL.
            self.handed_off[req.request_id] = (req, time.monotonic() + self.cfg.send_timeout_s + 1)
            self.send(req.ctx.decode_inbox, convert.kv_ready(handoff))
        for rel in out.releases:
            self.send(rel.request.ctx.decode_inbox, convert.release(rel))
        for failure in out.failed:
            self._send_failure(failure.request, convert.error_code(failure), failure.message, failure.peer,
                               failure.release_decode)

    def _send_failure(self, req: PrefillRequest, code: int, message: str, peer: str = "",
                      release_decode: bool = True) -> None:
        route = req.ctx
        self.fail(route.reply_to, req.request_id, code, message, peer=peer)
        if release_decode and peer not in (route.decode_instance, route.decode_inbox):
            self.send(route.decode_inbox, pb.AbortRequest(request_id=req.request_id, reason=message))

    def on_step_error(self, exc: Exception) -> None:
        self._emit(self.engine.fail_step(exc))

    # -- failure -----------------------------------------------------------------------
    def has_request(self, request_id: str) -> bool:
        return self.engine.has_request(request_id) or request_id in self.handed_off

    def drop_request(self, request_id: str, code: int, reason: str, peer: str = "") -> None:
        req = self.engine.request(request_id)
        if req is not None:
            self.engine.abort(request_id)
            self._send_failure(req, code, reason, peer)
            return
        handed, _ = self.handed_off.pop(request_id, (None, 0.0))
        if handed is not None:  # its first token went out; the gateway migrates it elsewhere
            self.fail(handed.ctx.reply_to, request_id, code, reason, peer=peer)

    def fail_all(self, reason: str) -> None:
        self._emit(self.engine.fail_all("UNAVAILABLE", reason))
