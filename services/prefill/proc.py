"""Prefill process: features in (one-sided READ), first token out, KV out (one-sided WRITE).

Loop steps: receive (requests, FeaturesReady, KvAllocated, aborts) ▸ expire timed-out
requests ▸ run the oldest ready request ▸ ship its KV ▸ KvReady.
"""

from __future__ import annotations

import logging
import time

import torch

from epd import device
from epd.config import PrefillConfig
from epd.device import torch_dtype
from epd.engine.kv_pool import KvPool, transfer_plan
from epd.engine.region_alloc import RangeAllocator, RegionFull
from epd.engine.sampling import Sampler, SamplingParams, finish_reason
from epd.models.qwen2_vl import Qwen2VLAdapter
from epd.service import ServiceProc
from epd.transfer import TransferError, merge_segments
from epd.wire.gen import epd_pb2 as pb
from services.prefill.core import PrefillState, check_kv_compatible, layout_from_proto

logger = logging.getLogger(__name__)

ORPHAN_TTL_S = 30.0  # FeaturesReady that arrived before its PrefillRequest is kept this long


class PrefillProc(ServiceProc):
    def __init__(self, config: PrefillConfig) -> None:
        super().__init__(config, "prefill", config.prefill_buffer_mb << 20)
        self.cfg = config
        self.adapter = Qwen2VLAdapter.load(config.model, dtype=torch_dtype(config.dtype))
        self.staging = RangeAllocator(self.region.nbytes)
        self.requests: dict[str, PrefillState] = {}
        self.orphans: dict[str, tuple[float, list[pb.FeaturesReady]]] = {}
        self.eos_ids = set(self.adapter.eos_token_ids)

    def handlers(self):
        return {
            "prefill_request": self.on_prefill_request,
            "features_ready": self.on_features_ready,
            "kv_allocated": self.on_kv_allocated,
            "request_failed": self.on_request_failed,
            "abort_request": self.on_abort,
        }

    def load(self):
        states = list(self.requests.values())
        return {
            "queued_requests": len(states),
            "queued_tokens": sum(len(s.req.prompt_token_ids) for s in states),
            "features_pending": sum(s.features_pending() for s in states),
        }

    # -- handlers ----------------------------------------------------------------------
    def on_prefill_request(self, env, req: pb.PrefillRequest, blobs) -> None:
        rid = req.request_id
        deadline = req.deadline or time.time() + self.cfg.request_timeout_s
        state = PrefillState(req=req, deadline=deadline)
        self.requests[rid] = state
        # Pre-allocate decode blocks now, before computing (receivers allocate, senders write).
        alloc = pb.KvAllocRequest(
            request_id=rid, num_tokens=len(req.prompt_token_ids),
            max_new_tokens=req.sampling.max_tokens, reply_to=self.inbox.address,
        )
        if not self.send(req.decode_inbox, alloc):
            self._fail(state, pb.UNAVAILABLE, "decode instance unreachable")
            return
        for ready in self.orphans.pop(rid, (0.0, []))[1]:
            self._fetch_features(state, ready)

    def on_features_ready(self, env, msg: pb.FeaturesReady, blobs) -> None:
        state = self.requests.get(msg.request_id)
        if state is None:  # raced ahead of the PrefillRequest
            self.orphans.setdefault(msg.request_id, (time.time(), []))[1].append(msg)
            return
        self._fetch_features(state, msg)

    def on_kv_allocated(self, env, msg: pb.KvAllocated, blobs) -> None:
        state = self.requests.get(msg.request_id)
        if state is None:  # request already gone: give the blocks back
            self.send(self._decode_inbox_of(msg), pb.AbortRequest(request_id=msg.request_id, reason="gone"))
            return
        try:
            check_kv_compatible(
                layout_from_proto(msg.layout), self.adapter.num_layers, self.adapter.num_kv_heads,
                self.adapter.head_dim,
            )
        except ValueError as exc:
            self._fail(state, pb.INTERNAL, str(exc))
            return
        state.kv_alloc = msg

    def on_request_failed(self, env, msg: pb.RequestFailed, blobs) -> None:
        state = self.requests.get(msg.request_id)
        if state is not None:
            self._fail(state, msg.code, f"{msg.stage}: {msg.message}", notify_decode=False)

    def on_abort(self, env, msg: pb.AbortRequest, blobs) -> None:
        self.orphans.pop(msg.request_id, None)
        state = self.requests.pop(msg.request_id, None)
        if state is not None and state.kv_alloc is not None:
            self.send(state.req.decode_inbox, pb.AbortRequest(request_id=msg.request_id, reason=msg.reason))

    # -- step --------------------------------------------------------------------------
    def step(self) -> bool:
        now = time.time()
        for state in [s for s in self.requests.values() if s.deadline < now]:
            self._fail(state, pb.TIMEOUT, "prefill: request timed out waiting for features or KV blocks")
        for rid in [r for r, (t, _) in self.orphans.items() if now - t > ORPHAN_TTL_S]:
            del self.orphans[rid]
        ready = next((s for s in self.requests.values() if s.is_ready()), None)
        if ready is None:
            return False
        self._run(ready)
        return any(s.is_ready() for s in self.requests.values())

    def _run(self, state: PrefillState) -> None:
        req = state.req
        rid = req.request_id
        params = SamplingParams.from_proto(req.sampling)
        t0 = time.perf_counter()
        features, grids = state.ordered_features()
        try:
            out = self.adapter.prefill(list(req.prompt_token_ids), features, grids)
        except Exception as exc:
            logger.exception("request %s: prefill forward failed", rid)
            self._fail(state, pb.INTERNAL, f"prefill error: {exc}")
            return
        token = Sampler(params, device.get_device()).sample(out.logits)
        t_forward = time.perf_counter() - t0
        reason = finish_reason(token, 1, params, self.eos_ids)
        self.send(req.reply_to, pb.TokenDelta(
            request_id=rid, token_ids=[token], finished=reason is not None, finish_reason=reason or "",
            num_prompt_tokens=len(req.prompt_token_ids), stage="prefill", offset=0,
        ))
        del self.requests[rid]
        if reason is not None:  # done after one token: release the reserved blocks
            self.send(req.decode_inbox, pb.AbortRequest(request_id=rid, reason="finished in prefill"))
            return
        try:
            nbytes = self._write_kv(state, out.kv)
        except (TransferError, RegionFull) as exc:
            self.fail(req.reply_to, rid, pb.UNAVAILABLE, f"KV transfer to decode failed: {exc}")
            self.send(req.decode_inbox, pb.AbortRequest(request_id=rid, reason="kv transfer failed"))
            return
        self.send(req.decode_inbox, pb.KvReady(
            request_id=rid, num_prompt_tokens=len(req.prompt_token_ids), first_token_id=token,
            rope_delta=int(out.rope_delta), sampling=req.sampling, reply_to=req.reply_to,
            deadline=state.deadline,
        ))
        logger.info(
            "request %s: prefill %d tokens in %.1f ms, KV %d bytes written in %.1f ms total",
            rid, len(req.prompt_token_ids), t_forward * 1e3, nbytes, (time.perf_counter() - t0) * 1e3,
        )

    # -- transfers ---------------------------------------------------------------------
    def _fetch_features(self, state: PrefillState, msg: pb.FeaturesReady) -> None:
        """READ one image's features from the encoder's pool into a local tensor."""
        ref = msg.features
        try:
            off = self.staging.allocate(ref.nbytes)
        except RegionFull as exc:
            self._fail(state, pb.OUT_OF_CAPACITY, f"prefill buffer full: {exc}")
            return
        try:
            self.transfer.read(self.region, ref.session, [off], [ref.offset], [ref.nbytes])
            raw = self.region.tensor[off : off + ref.nbytes]
            feats = raw.view(torch_dtype(ref.dtype)).view(list(ref.shape)).clone().to(device.get_device())
        except TransferError as exc:
            self._fail(state, pb.UNAVAILABLE, f"cannot read features of image {msg.index}: {exc}")
            return
        finally:
            self.staging.free(off)
        state.features[msg.index] = feats
        state.grids[msg.index] = tuple(msg.grid_thw)
        logger.info("request %s: read %d feature bytes of image %d from %s",
                    state.request_id, ref.nbytes, msg.index, msg.encoder_instance)

    def _write_kv(self, state: PrefillState, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Stage the prompt KV in decode's block geometry and WRITE it into decode's blocks."""
        alloc = state.kv_alloc
        dst = layout_from_proto(alloc.layout)
        block_ids = list(alloc.block_ids)
        needed = dst.blocks_for(kv[0][0].shape[1])
        block_ids = block_ids[:needed]
        src = dst.with_blocks(len(block_ids))
        off = self.staging.allocate(src.nbytes)
        try:
            staging = KvPool(src, self.region.tensor[off : off + src.nbytes])
            staging.scatter(kv, list(range(len(block_ids))))
            device.synchronize()
            local, remote, lengths = transfer_plan(src, dst, block_ids, range(dst.num_layers))
            local, remote, lengths = merge_segments([o + off for o in local], remote, lengths)
            self.transfer.write(self.region, alloc.session, local, remote, lengths)
        finally:
            self.staging.free(off)
        return sum(lengths)

    # -- failure -----------------------------------------------------------------------
    def _decode_inbox_of(self, msg: pb.KvAllocated) -> str:
        for inst in self.registry.instances("decode"):
            if inst.instance_id == msg.decode_instance:
                return inst.inbox
        return ""

    def _fail(self, state: PrefillState, code: int, message: str, notify_decode: bool = True) -> None:
        rid = state.request_id
        self.requests.pop(rid, None)
        self.fail(state.req.reply_to, rid, code, message)
        if notify_decode:
            self.send(state.req.decode_inbox, pb.AbortRequest(request_id=rid, reason=message))

    def fail_all(self, reason: str) -> None:
        for state in list(self.requests.values()):
            self._fail(state, pb.UNAVAILABLE, reason)
