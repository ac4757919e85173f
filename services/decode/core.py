"""Decode core: one continuous-batching step over the paged KV pool (no sockets).

``DecodeEngine.step()`` = admit queued block requests ▸ expire ▸ schedule a batch (every
member gets a KV slot; preempt when the pool is exhausted) ▸ one batched forward ▸ sample
per request ▸ finish what ended. It returns what the process must send; the process owns
the sockets. Requests join at the step after their KV arrives and leave when finished.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from epd.engine.decode_scheduler import DecodeRequest, DecodeScheduler, PendingAlloc
from epd.engine.kv_pool import KvPool
from epd.engine.sampling import Sampler, SamplingParams, finish_reason
from epd.models.qwen2_runner import Qwen2VLRunner

logger = logging.getLogger(__name__)
# one INFO line per finished request; epd profile's deployment probe reads it back (epd.plan.servicelog)
FINISHED_MSG = "request %s finished: %d tokens, %d steps of %.3f ms mean"


@dataclass
class StepOutput:
    """What one step produced.

    Attributes:
        admitted: requests whose blocks were just reserved (send KvAllocated).
        tokens: ``(request, token_id, finish_reason or None)`` per batch member.
        failed: ``(request, code name, message)`` for preempted / timed-out requests.
    """

    admitted: list[DecodeRequest] = field(default_factory=list)
    tokens: list[tuple[DecodeRequest, int, str | None]] = field(default_factory=list)
    failed: list[tuple[DecodeRequest, str, str]] = field(default_factory=list)


@dataclass
class SeqContext:
    """A decoding request's sampling state, and the seconds and count of the steps it was in
    (each step timed from scheduling to the last sample: the forward and its bookkeeping)."""

    params: SamplingParams
    sampler: Sampler
    step_s: float = 0.0
    steps: int = 0


class DecodeEngine:
    """Continuous batching over a KV pool.

    Args:
        runner: batched paged decode forward.
        pool: the KV block pool (its allocator is the scheduler's).
        max_batch: requests per step (``EPD_DECODE_MAX_BATCH``).
        eos_token_ids: ids that end a request unless ``ignore_eos``.
    """

    def __init__(self, runner: Qwen2VLRunner, pool: KvPool, max_batch: int, eos_token_ids: set[int]) -> None:
        self.runner = runner
        self.pool = pool
        self.sched = DecodeScheduler(pool.allocator, pool.layout.block_size, max_batch)
        self.eos = eos_token_ids
        self.device = runner.device

    def request_blocks(self, request_id: str, num_tokens: int, deadline: float, reply_to: str) -> None:
        """Queue a block reservation (KvAllocRequest). Raises ``ValueError`` if it can never fit."""
        self.sched.enqueue(PendingAlloc(request_id, num_tokens, deadline, reply_to))

    def start(self, request_id: str, first_token: int, rope_delta: int, params: SamplingParams,
              deadline: float) -> DecodeRequest:
        """KvReady: the prompt KV is in the blocks. Raises ``KeyError`` for an unknown request."""
        ctx = SeqContext(params, Sampler(params, self.device))
        return self.sched.start(request_id, first_token, rope_delta, deadline, ctx)

    def abort(self, request_id: str) -> bool:
        return self.sched.release(request_id) is not None

    def step(self, now: float | None = None) -> StepOutput:
        out = StepOutput(admitted=self.sched.admit())
        for req in self.sched.expired(time.time() if now is None else now):
            out.failed.append((req, "TIMEOUT", "decode: request timed out"))
        t0 = time.perf_counter()
        batch, preempted = self.sched.schedule()
        for req in preempted:
            out.failed.append((req, "OUT_OF_CAPACITY",
                               "decode: preempted, KV cache exhausted (retry, or lower max_tokens)"))
        if not batch:
            return out
        dev = self.device
        width = max(len(r.block_ids) for r in batch)
        tables = torch.tensor([r.block_ids + [r.block_ids[0]] * (width - len(r.block_ids)) for r in batch],
                              dtype=torch.long, device=dev)
        logits = self.runner.decode(
            torch.tensor([r.tokens[-1] for r in batch], dtype=torch.long, device=dev),
            torch.tensor([r.past_len + r.rope_delta for r in batch], dtype=torch.long, device=dev),
            self.pool.kv, tables,
            torch.tensor([r.past_len for r in batch], dtype=torch.long, device=dev),
        )
        for row, req in enumerate(batch):
            req.past_len += 1
            token = req.ctx.sampler.sample(logits[row])
            req.tokens.append(token)
            reason = finish_reason(token, len(req.tokens), req.ctx.params, self.eos)
            out.tokens.append((req, token, reason))
            if reason is not None:
                self.sched.release(req.request_id)
        dt = time.perf_counter() - t0
        for req, _, reason in out.tokens:
            req.ctx.step_s += dt
            req.ctx.steps += 1
            if reason is not None:
                logger.info(FINISHED_MSG, req.request_id, len(req.tokens), req.ctx.steps,
                            1e3 * req.ctx.step_s / req.ctx.steps)
        return out
