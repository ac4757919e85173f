"""Prefill engine core (vLLM v1's ``EngineCore`` side): feature prefetch bookkeeping, packed
prefill under a token budget, first-token sampling, KV hand-off through a :class:`KvConnector`.
No sockets, Redis, protobuf or transfer backends: the process (``services/prefill/proc.py``)
converts messages to the typed records of ``services/prefill/records.py`` and back.

``PrefillEngine.step()`` = finish the last batch's KV save (▸ hand-offs) *or* collect finished
feature reads ▸ expire ▸ pick the oldest ready requests under the token budget ▸ one packed
forward, each layer's K/V handed to the connector as it is computed ▸ sample first tokens.
The first tokens of a batch come out of the step that ran it; its hand-offs out of the next
one, so the first token never waits for the exposed part of the KV transfer (that is TTFT).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from epd.engine.region_alloc import RangeAllocator, RegionFull
from epd.engine.sampling import Sampler, finish_reason
from epd.models.qwen2_runner import Qwen2VLRunner
from epd.models.qwen2_vl import Qwen2VLAdapter
from services.prefill.core import PrefillState, check_kv_compatible, pick_batch
from services.prefill.feature_reader import FeatureReader, FeatureReadError
from services.prefill.kv_connector import KvConnector, KvSlot
from services.prefill.records import (
    Failure,
    FeatureRef,
    FirstToken,
    HandOff,
    KvTarget,
    PrefillLoad,
    PrefillOutputs,
    PrefillRequest,
    Release,
)

logger = logging.getLogger(__name__)

ORPHAN_TTL_S = 30.0  # features announced before their request are kept this long


@dataclass
class _Saving:
    """A request of the batch whose KV is being written."""

    state: PrefillState
    token: int
    reason: str | None
    rope_delta: int
    aborted: bool = False


class PrefillEngine:
    """Batched prefill of requests whose features and decode blocks have arrived.

    Args:
        adapter: the loaded model (language part).
        kv: where each batch's KV goes, layer by layer.
        features: how image features are read.
        max_tokens: prompt tokens per packed forward (``EPD_PREFILL_MAX_TOKENS``); a longer
            prompt runs alone.
        staging: the allocator of the buffer ``kv`` and ``features`` share, for the load
            record (``None``: reported as 0).
        runner: the forward to use (default: a new :class:`Qwen2VLRunner` over ``adapter``).
        return_logits: put each first token's logits in its :class:`FirstToken` (measurements).
    """

    def __init__(self, adapter: Qwen2VLAdapter, kv: KvConnector, features: FeatureReader, max_tokens: int,
                 staging: RangeAllocator | None = None, runner: Qwen2VLRunner | None = None,
                 return_logits: bool = False) -> None:
        self.adapter = adapter
        self.runner = runner or Qwen2VLRunner(adapter)
        self.kv, self.reader, self.max_tokens, self.staging = kv, features, max_tokens, staging
        self.device = self.runner.device
        self.return_logits = return_logits
        self.eos = set(adapter.eos_token_ids)
        self.dtype_name = str(adapter.dtype).removeprefix("torch.")
        self.requests: dict[str, PrefillState] = {}  # waiting or ready, in arrival order
        self.orphans: dict[str, tuple[float, list[FeatureRef]]] = {}  # request id -> (unix s, features)
        self.saving: list[_Saving] = []  # the batch whose KV writes the next step waits for
        self._running: list[PrefillState] = []  # the batch a step is running (failed if it raises)
        self._out = PrefillOutputs()  # outputs since the last step, returned by the next
        self._t_forward, self._batch_tokens = 0.0, 0  # of the batch in ``saving`` (for the log)

    # -- input ------------------------------------------------------------------------
    def add(self, req: PrefillRequest) -> None:
        """Accept a request; features announced before it start reading now. A request id
        already held replaces the old request."""
        old = self.requests.get(req.request_id)
        if old is not None:
            self._drop(old)
        state = self.requests[req.request_id] = PrefillState(req)
        for ref in self.orphans.pop(req.request_id, (0.0, []))[1]:
            self._prefetch(state, ref)

    def add_features(self, request_id: str, ref: FeatureRef) -> None:
        """One image's features are ready at the encoder: start reading them (kept for
        :data:`ORPHAN_TTL_S` if the request has not arrived yet)."""
        state = self.requests.get(request_id)
        if state is None:
            self.orphans.setdefault(request_id, (time.time(), []))[1].append(ref)
            return
        self._prefetch(state, ref)

    def set_kv_target(self, request_id: str, target: KvTarget) -> bool:
        """Decode reserved blocks for the request. Returns whether the request is held here; a
        pool whose geometry does not match the model fails it (``INTERNAL``)."""
        state = self.requests.get(request_id)
        if state is None:
            return False
        try:
            check_kv_compatible(target.layout, self.adapter.num_layers, self.adapter.num_kv_heads,
                                self.adapter.head_dim, self.dtype_name)
        except ValueError as exc:
            self._fail(state, "INTERNAL", str(exc))
            return True
        state.kv_target = target
        return True

    def abort(self, request_id: str) -> bool:
        """Forget the request (no output follows for it); its read buffers are freed once the
        reads settle, its KV staging once its batch's writes are done. Returns whether it was held."""
        self.orphans.pop(request_id, None)
        state = self.requests.get(request_id)
        if state is not None:
            self._drop(state)
            return True
        for item in self.saving:
            if item.state.request_id == request_id and not item.aborted:
                item.aborted = True
                return True
        return False

    def has_request(self, request_id: str) -> bool:
        return request_id in self.requests or any(
            s.state.request_id == request_id and not s.aborted for s in self.saving)

    def request(self, request_id: str) -> PrefillRequest | None:
        """The held request with this id (waiting, ready or saving), else ``None``."""
        state = self.requests.get(request_id)
        if state is not None:
            return state.req
        return next((s.state.req for s in self.saving if s.state.request_id == request_id and not s.aborted), None)

    # -- step -------------------------------------------------------------------------
    def step(self, now: float | None = None) -> PrefillOutputs:
        """One unit of work (see the module docstring); ``now`` is unix seconds (default: the clock)."""
        if self.saving:
            self._finish_save()
        else:
            self._collect_reads()
            self.reader.reap()
            self._expire(time.time() if now is None else now)
            ready = [s for s in self.requests.values() if s.is_ready()]
            if ready:
                self._run(pick_batch(ready, self.max_tokens))
        return self.take_outputs()

    def take_outputs(self) -> PrefillOutputs:
        """The outputs produced since the last step, without doing any work (e.g. at shutdown)."""
        out, self._out = self._out, PrefillOutputs()
        out.busy = bool(self.saving) or any(s.is_ready() or s.reads for s in self.requests.values())
        out.load = self.load()
        return out

    def fail_step(self, exc: Exception) -> PrefillOutputs:
        """A :meth:`step` raised: fail the requests it was working on (``INTERNAL``)."""
        self.kv.abort_batch()
        message = f"prefill: step failed: {type(exc).__name__}: {exc}"
        running, self._running = self._running, []
        saving, self.saving = self.saving, []
        for state in running:
            if state.request_id in self.requests:
                self._fail(state, "INTERNAL", message)
        for item in saving:
            if not item.aborted:
                self._out.failed.append(Failure(item.state.req, "INTERNAL", message))
        return self.take_outputs()

    def fail_all(self, code: str, message: str) -> PrefillOutputs:
        """Fail every held request (shutdown)."""
        for state in list(self.requests.values()):
            self._fail(state, code, message)
        self.kv.abort_batch()
        saving, self.saving = self.saving, []
        for item in saving:
            if not item.aborted:
                self._out.failed.append(Failure(item.state.req, code, message))
        return self.take_outputs()

    def load(self) -> PrefillLoad:
        """The load record (safe to call from another thread: reads only)."""
        states = list(self.requests.values()) + [s.state for s in list(self.saving) if not s.aborted]
        return PrefillLoad(
            queued_requests=len(states),
            queued_tokens=sum(s.num_tokens for s in states),
            features_pending=sum(s.features_pending() for s in states),
            staging_used_bytes=self.staging.used_bytes if self.staging is not None else 0,
        )

    # -- the batch --------------------------------------------------------------------
    def _run(self, batch: list[PrefillState]) -> None:
        t0 = time.perf_counter()
        embeds, positions, deltas, good = [], [], [], []
        for state in batch:
            features, grids = state.ordered_features()
            try:
                e, p, d = self.adapter.prompt_inputs(list(state.req.prompt_token_ids), features, grids)
            except ValueError as exc:
                self._fail(state, "INVALID_REQUEST", f"prefill: {exc}")
                continue
            embeds.append(e)
            positions.append(p)
            deltas.append(int(d))
            good.append(state)
        if not good:
            return
        self._running = good
        slots, start = [], 0
        for state in good:
            slots.append(KvSlot(state.request_id, state.kv_target, start, state.num_tokens))
            start += state.num_tokens
        try:
            self.kv.start_batch(slots)
            logits = self.runner.prefill(torch.cat(embeds), torch.cat(positions, dim=1),
                                         [s.num_tokens for s in good], self.kv.save_kv_layer)
        except Exception as exc:  # a failed batch fails its requests, never the instance
            self.kv.abort_batch()
            self._running = []
            logger.exception("prefill batch of %d failed", len(good))
            code = "OUT_OF_CAPACITY" if isinstance(exc, RegionFull) else "INTERNAL"
            for state in good:
                self._fail(state, code, f"prefill error: {exc}")
            return
        self._t_forward, self._batch_tokens = time.perf_counter() - t0, start
        saving = []
        for row, (state, delta) in enumerate(zip(good, deltas, strict=True)):
            params = state.req.params
            token = Sampler(params, self.device).sample(logits[row])
            reason = finish_reason(token, 1, params, self.eos)
            kept = logits[row].float().cpu() if self.return_logits else None
            self._out.first_tokens.append(FirstToken(state.req, token, reason, kept))
            saving.append(_Saving(state, token, reason, delta))
        for state in good:
            del self.requests[state.request_id]
        self.saving, self._running = saving, []

    def _finish_save(self) -> None:
        result = self.kv.wait_for_save()
        saving, self.saving = self.saving, []
        self._out.kv_bytes, self._out.kv_exposed_s = result.nbytes, result.exposed_s
        for item in saving:
            if item.aborted:  # the caller already released decode's blocks
                continue
            req, error = item.state.req, result.failed.get(item.state.request_id)
            if item.reason is None and error is None:
                self._out.handoffs.append(HandOff(req, item.token, item.rope_delta))
                continue
            if error is not None and item.reason is None:
                target = item.state.kv_target
                self._out.failed.append(Failure(req, "UNAVAILABLE", f"KV transfer to decode failed: {error}",
                                                peer=target.source if target else "", release_decode=False))
            self._out.releases.append(Release(req, "finished in prefill" if item.reason else "kv failed"))
        logger.info(
            "prefill batch of %d (%d tokens): forward %.1f ms, KV %d bytes written, exposed transfer %.2f ms",
            len(saving), self._batch_tokens, self._t_forward * 1e3, result.nbytes, result.exposed_s * 1e3,
        )

    def _expire(self, now: float) -> None:
        for state in [s for s in self.requests.values() if s.deadline < now]:
            self._fail(state, "TIMEOUT", "prefill: request timed out waiting for features or KV blocks")
        for rid in [r for r, (t, _) in self.orphans.items() if now - t > ORPHAN_TTL_S]:
            del self.orphans[rid]

    # -- feature prefetch -------------------------------------------------------------
    def _prefetch(self, state: PrefillState, ref: FeatureRef) -> None:
        if ref.index in state.features or ref.index in state.reads:
            return
        try:
            state.reads[ref.index] = self.reader.start(ref)
        except RegionFull as exc:
            self._fail(state, "OUT_OF_CAPACITY", f"prefill buffer full: {exc}")
        except FeatureReadError as exc:
            self._fail(state, "UNAVAILABLE", f"cannot read features of image {ref.index}: {exc}", peer=ref.source)

    def _collect_reads(self) -> None:
        for state in list(self.requests.values()):
            for index, read in list(state.reads.items()):
                if not read.done():
                    continue
                del state.reads[index]
                try:
                    feats = read.result()
                except FeatureReadError as exc:
                    self._fail(state, "UNAVAILABLE", f"cannot read features of image {index}: {exc}",
                               peer=read.ref.source)
                    break
                state.features[index] = feats.to(self.device)
                state.grids[index] = read.ref.grid_thw
                logger.info("request %s: read %d feature bytes of image %d from %s in %.2f ms", state.request_id,
                            read.ref.nbytes, index, read.ref.source, read.elapsed_s * 1e3)

    # -- failure ----------------------------------------------------------------------
    def _drop(self, state: PrefillState) -> None:
        self.requests.pop(state.request_id, None)
        for read in state.reads.values():
            self.reader.discard(read)
        state.reads.clear()

    def _fail(self, state: PrefillState, code: str, message: str, peer: str = "") -> None:
        self._drop(state)
        self._out.failed.append(Failure(state.req, code, message, peer=peer))
