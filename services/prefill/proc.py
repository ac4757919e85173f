"""Prefill process: features in (asynchronous one-sided READ), first token out, KV out
(one-sided WRITE, layer group by layer group).

Loop steps: receive (requests, FeaturesReady → start prefetch, KvAllocated, failures,
aborts) ▸ collect finished prefetches ▸ expire timed-out requests ▸ run one packed batch
of ready requests under the token budget ▸ KvReady.
"""

from __future__ import annotations

import logging
import time

import torch

from epd import device
from epd.config import PrefillConfig
from epd.device import torch_dtype
from epd.engine.region_alloc import RangeAllocator, RegionFull
from epd.engine.sampling import Sampler, SamplingParams, finish_reason
from epd.engine.tombstones import Tombstones
from epd.models.qwen2_runner import Qwen2VLRunner
from epd.models.qwen2_vl import Qwen2VLAdapter, role_parts
from epd.service import ServiceProc
from epd.transfer import TransferError, TransferFuture
from epd.wire.gen import epd_pb2 as pb
from services.prefill.core import Prefetch, PrefillState, check_kv_compatible, layout_from_proto, pick_batch
from services.prefill.kv_sender import KvSender

logger = logging.getLogger(__name__)

ORPHAN_TTL_S = 30.0  # FeaturesReady that arrived before its PrefillRequest is kept this long


class PrefillProc(ServiceProc):
    def __init__(self, config: PrefillConfig, adapter: Qwen2VLAdapter | None = None) -> None:
        super().__init__(config, "prefill", config.prefill_buffer_mb << 20)
        self.cfg = config
        self.adapter = adapter or Qwen2VLAdapter.load(
            config.model, dtype=torch_dtype(config.dtype), parts=role_parts("prefill")
        )
        self.runner = Qwen2VLRunner(self.adapter)
        self.dtype_name = str(self.adapter.dtype).removeprefix("torch.")
        self.staging = RangeAllocator(self.region.nbytes)
        self.requests: dict[str, PrefillState] = {}
        self.orphans: dict[str, tuple[float, list[pb.FeaturesReady]]] = {}
        self.eos_ids = set(self.adapter.eos_token_ids)
        self.aborted = Tombstones(ttl_s=ORPHAN_TTL_S)
        self._batch: list[PrefillState] = []  # the batch a step is running (failed if the step raises)
        self.handed_off: dict[str, tuple[PrefillState, float]] = {}  # KvReady sent, delivery not yet certain
        self.parked: list[tuple[TransferFuture, int]] = []  # staging of dropped requests' unsettled reads

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
            "queued_tokens": sum(s.num_tokens for s in states),
            "features_pending": sum(s.features_pending() for s in states),
            "staging_used_bytes": self.staging.used_bytes,
        }

    # -- handlers ----------------------------------------------------------------------
    def on_prefill_request(self, env, req: pb.PrefillRequest, blobs) -> None:
        rid = req.request_id
        if rid in self.aborted:  # its AbortRequest overtook it
            logger.info("request %s: arrived after its abort, dropped", rid)
            return
        state = PrefillState(req=req, deadline=req.deadline or time.time() + self.cfg.request_timeout_s)
        self.requests[rid] = state
        self.track(rid, ids=(env.sender, req.decode_instance))
        # Reserve decode blocks now, before computing (receivers allocate, senders write).
        alloc = pb.KvAllocRequest(request_id=rid, num_tokens=state.num_tokens,
                                  max_new_tokens=req.sampling.max_tokens, reply_to=self.inbox.address)
        self.send(req.decode_inbox, alloc)
        for ready in self.orphans.pop(rid, (0.0, []))[1]:
            self._prefetch(state, ready)

    def on_features_ready(self, env, msg: pb.FeaturesReady, blobs) -> None:
        state = self.requests.get(msg.request_id)
        if msg.request_id in self.aborted:
            return
        if state is None:  # raced ahead of its PrefillRequest
            self.orphans.setdefault(msg.request_id, (time.time(), []))[1].append(msg)
            return
        self._prefetch(state, msg)

    def on_kv_allocated(self, env, msg: pb.KvAllocated, blobs) -> None:
        state = self.requests.get(msg.request_id)
        if state is None:  # request already gone: the decode side frees on its AbortRequest/timeout
            return
        try:
            check_kv_compatible(layout_from_proto(msg.layout), self.adapter.num_layers, self.adapter.num_kv_heads,
                                self.adapter.head_dim, self.dtype_name)
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
        self.handed_off.pop(msg.request_id, None)
        self.aborted.add(msg.request_id)
        state = self.requests.get(msg.request_id)
        if state is not None:
            self._drop(state)
            self.send(state.req.decode_inbox, pb.AbortRequest(request_id=msg.request_id, reason=msg.reason))

    # -- step --------------------------------------------------------------------------
    def step(self) -> bool:
        self._collect_prefetches()
        if self.parked:
            self._free_parked()
        mono = time.monotonic()
        for rid in [r for r, (_, until) in self.handed_off.items() if until < mono]:
            del self.handed_off[rid]
        now = time.time()
        for state in [s for s in self.requests.values() if s.deadline < now]:
            self._fail(state, pb.TIMEOUT, "prefill: request timed out waiting for features or KV blocks")
        for rid in [r for r, (t, _) in self.orphans.items() if now - t > ORPHAN_TTL_S]:
            del self.orphans[rid]
        ready = [s for s in self.requests.values() if s.is_ready()]
        if not ready:
            return any(s.prefetches for s in self.requests.values())
        self._batch = pick_batch(ready, self.cfg.prefill_max_tokens)
        self._run(self._batch)
        self._batch = []
        return True

    def on_step_error(self, exc: Exception) -> None:
        batch, self._batch = self._batch, []
        for state in batch:
            if state.request_id in self.requests:
                self._fail(state, pb.INTERNAL, f"prefill: step failed: {type(exc).__name__}: {exc}")

    def _run(self, batch: list[PrefillState]) -> None:
        t0 = time.perf_counter()
        embeds, positions, deltas, good = [], [], [], []
        for state in batch:
            features, grids = state.ordered_features()
            try:
                e, p, d = self.adapter.prompt_inputs(list(state.req.prompt_token_ids), features, grids)
            except ValueError as exc:
                self._fail(state, pb.INVALID_REQUEST, f"prefill: {exc}")
                continue
            embeds.append(e)
            positions.append(p)
            deltas.append(d)
            good.append(state)
        if not good:
            return
        sender = KvSender(self.transfer, self.region, self.staging, self.adapter.num_layers, self.cfg.kv_layer_group)
        start = 0
        try:
            for state in good:
                alloc = state.kv_alloc
                sender.add(state.request_id, alloc.session, layout_from_proto(alloc.layout), list(alloc.block_ids),
                           start, state.num_tokens)
                start += state.num_tokens
            logits = self.runner.prefill(torch.cat(embeds), torch.cat(positions, dim=1),
                                         [s.num_tokens for s in good], sender.on_layer)
        except Exception as exc:  # a failed batch fails its requests, never the instance
            sender.close()
            logger.exception("prefill batch of %d failed", len(good))
            for state in good:
                self._fail(state, pb.INTERNAL if not isinstance(exc, RegionFull) else pb.OUT_OF_CAPACITY,
                           f"prefill error: {exc}")
            return
        t_forward = time.perf_counter() - t0
        finished = {}
        for row, state in enumerate(good):
            params = SamplingParams.from_proto(state.req.sampling)
            token = Sampler(params, device.get_device()).sample(logits[row])
            reason = finish_reason(token, 1, params, self.eos_ids)
            self.send(state.req.reply_to, pb.TokenDelta(
                request_id=state.request_id, token_ids=[token], finished=reason is not None,
                finish_reason=reason or "", num_prompt_tokens=state.num_tokens, stage="prefill", offset=0,
            ))
            finished[state.request_id] = (token, reason)
        result = sender.finish()
        for state, delta in zip(good, deltas, strict=True):
            del self.requests[state.request_id]
            token, reason = finished[state.request_id]
            error = result.failed.get(state.request_id)
            if reason is None and error is None:
                # Until the hand-off is delivered the request is still ours: a decode found dead
                # meanwhile fails it here (the gateway migrates it) instead of after a whole TTL.
                self.handed_off[state.request_id] = (state, time.monotonic() + self.cfg.send_timeout_s + 1)
                self.send(state.req.decode_inbox, pb.KvReady(
                    request_id=state.request_id, num_prompt_tokens=state.num_tokens, first_token_id=token,
                    rope_delta=int(delta), sampling=state.req.sampling, reply_to=state.req.reply_to,
                    deadline=state.deadline,
                ))
                continue
            if error is not None and reason is None:
                self.fail(state.req.reply_to, state.request_id, pb.UNAVAILABLE,
                          f"KV transfer to decode failed: {error}", peer=state.req.decode_instance)
            self.send(state.req.decode_inbox, pb.AbortRequest(request_id=state.request_id,
                                                              reason="finished in prefill" if reason else "kv failed"))
        logger.info(
            "prefill batch of %d (%d tokens): forward %.1f ms, KV %d bytes written, exposed transfer %.2f ms "
            "(layer group %d)", len(good), start, t_forward * 1e3, result.nbytes, result.exposed_s * 1e3,
            self.cfg.kv_layer_group,
        )

    # -- feature prefetch --------------------------------------------------------------
    def _prefetch(self, state: PrefillState, msg: pb.FeaturesReady) -> None:
        """Start an asynchronous READ of one image's features from the encoder's pool."""
        if msg.index in state.features or msg.index in state.prefetches:
            return
        ref = msg.features
        try:
            off = self.staging.allocate(ref.nbytes)
        except RegionFull as exc:
            self._fail(state, pb.OUT_OF_CAPACITY, f"prefill buffer full: {exc}")
            return
        try:
            fut = self.transfer.read_async(self.region, ref.session, [off], [ref.offset], [ref.nbytes])
        except TransferError as exc:
            self.staging.free(off)
            self._fail(state, pb.UNAVAILABLE, f"cannot read features of image {msg.index}: {exc}",
                       peer=msg.encoder_instance)
            return
        state.prefetches[msg.index] = Prefetch(msg.index, ref, tuple(msg.grid_thw), off, fut, msg.encoder_instance,
                                               time.perf_counter())

    def _collect_prefetches(self) -> None:
        for state in list(self.requests.values()):
            for index, pf in list(state.prefetches.items()):
                if not pf.future.done():
                    continue
                del state.prefetches[index]
                try:
                    pf.future.wait(0)
                    raw = self.region.tensor[pf.staging_offset : pf.staging_offset + pf.ref.nbytes]
                    feats = raw.view(torch_dtype(pf.ref.dtype)).view(list(pf.ref.shape)).clone()
                except TransferError as exc:
                    self.staging.free(pf.staging_offset)
                    self._fail(state, pb.UNAVAILABLE, f"cannot read features of image {index}: {exc}",
                               peer=pf.encoder_instance)
                    break
                self.staging.free(pf.staging_offset)
                state.features[index] = feats.to(device.get_device())
                state.grids[index] = pf.grid_thw
                logger.info("request %s: read %d feature bytes of image %d from %s in %.2f ms",
                            state.request_id, pf.ref.nbytes, index, pf.encoder_instance, pf.future.elapsed_s * 1e3)

    # -- failure -----------------------------------------------------------------------
    def _drop(self, state: PrefillState) -> None:
        """Forget a request. The staging of a read still in flight is freed once the read settles
        (it may still land bytes there), without waiting for it here: a stopped encoder must not
        stall this loop for a whole transfer timeout."""
        self.requests.pop(state.request_id, None)
        for pf in state.prefetches.values():
            if pf.future.done():
                self.staging.free(pf.staging_offset)
            else:
                self.parked.append((pf.future, pf.staging_offset))
        state.prefetches.clear()

    def _free_parked(self) -> None:
        still = []
        for fut, offset in self.parked:
            if fut.done():
                self.staging.free(offset)
            else:
                still.append((fut, offset))
        self.parked = still

    def _fail(self, state: PrefillState, code: int, message: str, notify_decode: bool = True, peer: str = "") -> None:
        self._drop(state)
        self.fail(state.req.reply_to, state.request_id, code, message, peer=peer)
        if notify_decode and peer not in (state.req.decode_instance, state.req.decode_inbox):
            self.send(state.req.decode_inbox, pb.AbortRequest(request_id=state.request_id, reason=message))

    def has_request(self, request_id: str) -> bool:
        return request_id in self.requests or request_id in self.handed_off

    def drop_request(self, request_id: str, code: int, reason: str, peer: str = "") -> None:
        state = self.requests.get(request_id)
        if state is not None:
            self._fail(state, code, reason, peer=peer)
            return
        handed, _ = self.handed_off.pop(request_id, (None, 0.0))
        if handed is not None:  # its first token went out; the gateway migrates it elsewhere
            self.fail(handed.req.reply_to, request_id, code, reason, peer=peer)

    def fail_all(self, reason: str) -> None:
        for state in list(self.requests.values()):
            self._fail(state, pb.UNAVAILABLE, reason)
