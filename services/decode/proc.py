"""Decode process: owns the KV block pool; generates tokens for every running request.

Loop steps: receive (KvAllocRequest, KvReady, aborts) ▸ expire timed-out reservations ▸
one decode step for each running request ▸ stream TokenDelta ▸ free finished requests.
"""

from __future__ import annotations

import logging
import time

from epd import device
from epd.config import DecodeConfig
from epd.device import torch_dtype
from epd.engine.kv_pool import KvLayout, KvPool, OutOfBlocks
from epd.engine.sampling import Sampler, SamplingParams, finish_reason
from epd.models.qwen2_vl import Qwen2VLAdapter
from epd.service import ServiceProc
from epd.wire.gen import epd_pb2 as pb
from services.decode.core import BlockLedger, Sequence

logger = logging.getLogger(__name__)


class DecodeProc(ServiceProc):
    def __init__(self, config: DecodeConfig) -> None:
        adapter = Qwen2VLAdapter.load(config.model, dtype=torch_dtype(config.dtype))
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
        self.adapter = adapter
        self.layout = layout
        self.ledger = BlockLedger(KvPool(layout, self.region.tensor))
        self.running: dict[str, Sequence] = {}
        self.eos_ids = set(adapter.eos_token_ids)
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
        alloc = self.ledger.pool.allocator
        return {
            "running": len(self.running),
            "reserved": len(self.ledger.reservations),
            "free_blocks": alloc.num_free,
            "total_blocks": alloc.num_blocks,
        }

    # -- handlers ----------------------------------------------------------------------
    def on_kv_alloc_request(self, env, msg: pb.KvAllocRequest, blobs) -> None:
        deadline = time.time() + self.cfg.request_timeout_s
        try:
            res = self.ledger.reserve(msg.request_id, msg.num_tokens, msg.max_new_tokens, deadline)
        except (OutOfBlocks, ValueError) as exc:
            self.fail(msg.reply_to, msg.request_id, pb.OUT_OF_CAPACITY, str(exc))
            return
        lay = self.layout
        self.send(msg.reply_to, pb.KvAllocated(
            request_id=msg.request_id, session=self.region.handle,
            layout=pb.KvLayout(
                num_layers=lay.num_layers, num_blocks=lay.num_blocks, block_size=lay.block_size,
                num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, dtype=lay.dtype,
            ),
            block_ids=res.block_ids, decode_instance=self.instance_id,
        ))

    def on_kv_ready(self, env, msg: pb.KvReady, blobs) -> None:
        rid = msg.request_id
        res = self.ledger.reservations.get(rid)
        if res is None:
            self.fail(msg.reply_to, rid, pb.INTERNAL, "decode holds no KV blocks for this request")
            return
        res.deadline = msg.deadline or res.deadline
        params = SamplingParams.from_proto(msg.sampling)
        kv = self.ledger.pool.gather(res.block_ids, msg.num_prompt_tokens)
        self.running[rid] = Sequence(
            reservation=res, params=params, sampler=Sampler(params, device.get_device()),
            reply_to=msg.reply_to, rope_delta=msg.rope_delta, past_len=msg.num_prompt_tokens,
            cache=self.adapter.make_cache(kv), tokens=[msg.first_token_id],
        )

    def on_abort(self, env, msg: pb.AbortRequest, blobs) -> None:
        self.running.pop(msg.request_id, None)
        self.ledger.release(msg.request_id)

    # -- step --------------------------------------------------------------------------
    def step(self) -> bool:
        now = time.time()
        for rid in self.ledger.expired(now):
            seq = self.running.pop(rid, None)
            self.ledger.release(rid)
            if seq is not None:
                self.fail(seq.reply_to, rid, pb.TIMEOUT, "decode: request timed out")
            else:
                logger.warning("request %s: KV never arrived, blocks released", rid)
        if not self.running:
            return False
        for seq in list(self.running.values()):
            self._step_one(seq)
        return bool(self.running)

    def _step_one(self, seq: Sequence) -> None:
        rid = seq.request_id
        try:
            logits = self.adapter.decode_step(seq.tokens[-1], seq.cache, seq.past_len, seq.rope_delta)
        except Exception as exc:
            logger.exception("request %s: decode step failed", rid)
            self._finish(seq)
            self.fail(seq.reply_to, rid, pb.INTERNAL, f"decode error: {exc}")
            return
        seq.past_len += 1
        token = seq.sampler.sample(logits)
        seq.tokens.append(token)
        reason = finish_reason(token, len(seq.tokens), seq.params, self.eos_ids)
        self.send(seq.reply_to, pb.TokenDelta(
            request_id=rid, token_ids=[token], finished=reason is not None, finish_reason=reason or "",
            num_prompt_tokens=seq.reservation.num_prompt_tokens, stage="decode", offset=len(seq.tokens) - 1,
        ))
        if reason is not None:
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self.running.pop(seq.request_id, None)
        self.ledger.release(seq.request_id)

    def fail_all(self, reason: str) -> None:
        for seq in list(self.running.values()):
            self._finish(seq)
            self.fail(seq.reply_to, seq.request_id, pb.UNAVAILABLE, reason)
        for rid in list(self.ledger.reservations):
            self.ledger.release(rid)
