"""Decode process (vLLM v1's ``EngineCoreProc`` side): messages → :class:`DecodeEngine` →
messages (conversions in ``services/decode/convert.py``). Owns the KV block pool; continuous
batching over every running request.

Loop steps: receive (KvAllocRequest → queued, KvReady → joins, AbortRequest → freed) ▸
engine step (admit ▸ expire ▸ schedule ▸ one batched forward ▸ sample) ▸ send KvAllocated,
TokenDelta and RequestFailed.
"""

from __future__ import annotations

import logging
import time

from epd.config import DecodeConfig
from epd.device import torch_dtype
from epd.engine.kv_pool import KvLayout, KvPool
from epd.engine.tombstones import Tombstones
from epd.models.qwen2_runner import Qwen2VLRunner
from epd.models.qwen2_vl import Qwen2VLAdapter, role_parts
from epd.service import ServiceProc
from epd.wire.gen import epd_pb2 as pb
from services.decode import convert
from services.decode.core import DecodeEngine, StepOutput

logger = logging.getLogger(__name__)


class DecodeProc(ServiceProc):
    def __init__(self, config: DecodeConfig, adapter: Qwen2VLAdapter | None = None) -> None:
        adapter = adapter or Qwen2VLAdapter.load(
            config.model, dtype=torch_dtype(config.dtype), parts=role_parts("decode"),
            batch_invariant=config.batch_invariant,
        )
        per_block = KvLayout(
            adapter.num_layers, 1, config.kv_block_size, adapter.num_kv_heads, adapter.head_dim, config.dtype
        ).nbytes
        num_blocks = config.kv_blocks or KvLayout.blocks_in(config.kv_memory_mb << 20, per_block)
        layout = KvLayout(
            adapter.num_layers, num_blocks, config.kv_block_size, adapter.num_kv_heads, adapter.head_dim,
            config.dtype,
        )
        super().__init__(config, "decode", layout.nbytes)
        self.cfg = config
        self.adapter = adapter  # kept for a role switch that can reuse the weights
        self.layout = layout
        self.engine = DecodeEngine(Qwen2VLRunner(adapter), KvPool(layout, self.region.tensor),
                                   config.decode_max_batch, set(adapter.eos_token_ids))
        self.reply_to: dict[str, str] = {}  # request id -> gateway inbox, once KvReady arrived
        self.aborted = Tombstones(ttl_s=60.0)  # aborts that may overtake a KvAllocRequest
        logger.info("KV pool: %d blocks x %d tokens, %d bytes", num_blocks, config.kv_block_size, layout.nbytes)

    def handlers(self):
        return {
            "kv_alloc_request": self.on_kv_alloc_request,
            "kv_ready": self.on_kv_ready,
            "abort_request": self.on_abort,
        }

    def capacity(self):
        return {"kv_blocks": self.layout.num_blocks, "block_size": self.layout.block_size}

    def load(self):
        sched = self.engine.sched
        return {
            "running": len(sched.running),
            "reserved": len(sched.reserved),
            "queued": len(sched.queue),
            "free_blocks": sched.allocator.num_free,
            "total_blocks": sched.allocator.num_blocks,
        }

    # -- handlers ----------------------------------------------------------------------
    def on_kv_alloc_request(self, env, msg: pb.KvAllocRequest, blobs) -> None:
        if msg.request_id in self.aborted:
            logger.info("request %s: block request arrived after its abort, dropped", msg.request_id)
            return
        try:
            self.engine.request_blocks(msg.request_id, msg.num_tokens, time.time() + self.cfg.request_timeout_s,
                                       msg.reply_to)
        except ValueError as exc:
            self.fail(msg.reply_to, msg.request_id, pb.OUT_OF_CAPACITY, str(exc))
            return
        self.track(msg.request_id, ids=(env.sender,))  # a dead prefill's reservations are freed

    def on_kv_ready(self, env, msg: pb.KvReady, blobs) -> None:
        if msg.request_id in self.aborted:
            return
        try:
            self.engine.start(msg.request_id, msg.first_token_id, msg.rope_delta, convert.sampling_from_proto(msg),
                              msg.deadline)
        except KeyError:
            self.fail(msg.reply_to, msg.request_id, pb.INTERNAL, "decode holds no KV blocks for this request")
            return
        self.reply_to[msg.request_id] = msg.reply_to
        # From now on only the gateway matters: nobody to stream to once it is gone.
        self.track(msg.request_id, inboxes=(msg.reply_to,), replace=True)

    def on_abort(self, env, msg: pb.AbortRequest, blobs) -> None:
        self.aborted.add(msg.request_id)
        self.engine.abort(msg.request_id)
        self.reply_to.pop(msg.request_id, None)

    # -- step --------------------------------------------------------------------------
    def step(self) -> bool:
        out = self.engine.step()
        self._emit(out)
        sched = self.engine.sched
        return bool(sched.running) or bool(out.admitted)

    def _emit(self, out: StepOutput) -> None:
        for req in out.admitted:
            self.send(req.reply_to, convert.kv_allocated(req, self.region.handle, self.layout, self.instance_id))
        for req, token, reason in out.tokens:
            self.send(self.reply_to.get(req.request_id, ""), convert.token_delta(req, token, reason))
            if reason is not None:
                self.reply_to.pop(req.request_id, None)
        for req, code, message in out.failed:
            # before KvReady the failure goes to prefill (which tells the gateway), after it to the gateway
            target = self.reply_to.pop(req.request_id, None) or req.reply_to
            self.fail(target, req.request_id, convert.error_code(code), message)

    def has_request(self, request_id: str) -> bool:
        return self.engine.sched.knows(request_id)

    def drop_request(self, request_id: str, code: int, reason: str, peer: str = "") -> None:
        """Free the request's blocks; tell prefill (before KvReady) or the gateway (after)."""
        req = self.engine.sched.release(request_id)
        if req is None:
            return
        self.aborted.add(request_id)
        target = self.reply_to.pop(request_id, None) or req.reply_to
        self.fail(target, request_id, code, reason, peer=peer)

    def on_step_error(self, exc: Exception) -> None:
        for request_id in list(self.engine.sched.running):
            self.drop_request(request_id, pb.INTERNAL, f"decode: step failed: {type(exc).__name__}: {exc}")

    def fail_all(self, reason: str) -> None:
        sched = self.engine.sched
        for req in [*sched.running.values(), *sched.reserved.values()]:
            target = self.reply_to.pop(req.request_id, None) or req.reply_to
            self.engine.abort(req.request_id)
            self.fail(target, req.request_id, pb.UNAVAILABLE, reason)
        for alloc in list(sched.queue):
            self.engine.abort(alloc.request_id)
            self.fail(alloc.reply_to, alloc.request_id, pb.UNAVAILABLE, reason)
