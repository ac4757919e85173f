"""One client request across the attempts it takes to serve it (DESIGN.md §3, §9).

An attempt is one trip through the pipeline under its own request id. When a stage of the
current attempt fails with ``UNAVAILABLE`` (a stage it depends on is gone, a message could
not be delivered, an instance shut down) or the gateway's registry watch finds one of its
stages gone (``stage_lost``), the request is not lost:

- **retry** — the current attempt produced no token yet: it is aborted everywhere and planned
  again (re-encode or cached route, re-prefill) on usable instances, the failed one excluded
  as a suspect; at most ``EPD_RETRY_MAX`` times (vLLM's disaggregated proxy retries before
  the first byte; SGLang falls back to re-encoding). A migration that fails before its first
  token is retried the same way;
- **migration** — tokens were already produced: a new attempt prefills prompt + tokens so far
  on a live prefill and continues on a live decode with the remaining budget, and its tokens
  are appended at the right offsets, so the client sees one seamless stream (Dynamo's request
  migration); at most ``EPD_MIGRATION_MAX`` times, 0 turns it off. Greedy output stays
  token-exact: the re-prefilled context is the same sequence decode would have continued.
  A seeded non-greedy request continues with a fresh random stream.

Anything else (a bad request, a timeout, a budget used up) ends the request with a clear
error: a JSON error before the first byte, an SSE error event after it.
"""

from __future__ import annotations

import asyncio
import logging

from epd.wire.gen import epd_pb2 as pb
from services.gateway.core import Admitted, GatewayCore, StageUnreachable
from services.gateway.prompt import Prompt
from services.gateway.protocol import ApiError

logger = logging.getLogger(__name__)


class RequestRun:
    """The attempts of one client request.

    Args:
        gw: the gateway core.
        rid: the client-visible request id (the first attempt's wire id too).
        sampling: sampling parameters; ``max_tokens`` is the whole budget.
        prompt: the request's prompt.
        t_arrival: ``time.perf_counter()`` at the HTTP handler's start.

    Attributes:
        attempt: the current :class:`Admitted` attempt.
        retries, migrations: how many of each were made.
    """

    def __init__(self, gw: GatewayCore, rid: str, sampling: pb.SamplingParams, prompt: Prompt,
                 t_arrival: float) -> None:
        self.gw, self.rid, self.sampling, self.prompt, self.t_arrival = gw, rid, sampling, prompt, t_arrival
        self.attempt: Admitted | None = None
        self.retries = 0
        self.migrations = 0
        self._n = 0
        self._base = 0  # tokens produced before the current attempt

    async def start(self) -> asyncio.Queue:
        """Submit the first attempt; returns its message queue.

        Raises:
            ApiError: no usable instance (503/429), or every retry of an unreachable stage failed (503).
        """
        return await self._submit(self.prompt, self.sampling.max_tokens, self.rid)

    async def _submit(self, prompt: Prompt, max_tokens: int, rid: str) -> asyncio.Queue:
        sampling = pb.SamplingParams()
        sampling.CopyFrom(self.sampling)
        sampling.max_tokens = max_tokens
        while True:
            try:
                self.attempt = await self.gw.submit(rid, sampling, prompt, max_tokens, self.t_arrival)
                return self.attempt.queue
            except StageUnreachable as exc:
                self.gw.suspect(exc.instance_id, exc.incarnation)
                if self.retries >= self.gw.cfg.retry_max:
                    logger.warning("request %s: %s; not retried (EPD_RETRY_MAX=%d used)", self.rid, exc,
                                   self.gw.cfg.retry_max)
                    raise ApiError(503, str(exc), type_="service_unavailable", headers={"Retry-After": "1"}) from None
                self.retries += 1
                self.gw.metrics.recoveries.labels("retry").inc()
                rid = self._next_id("r")
                logger.warning("request %s: %s; retrying as %s", self.rid, exc, rid)

    def _next_id(self, kind: str) -> str:
        self._n += 1
        return f"{self.rid}-{kind}{self._n}"

    async def recover(self, code: int, message: str, peer: str, emitted: list[int]) -> asyncio.Queue | None:
        """Replace the failed attempt, if the failure and the budgets allow it.

        Args:
            code: the failure's ``ErrorCode`` (only ``UNAVAILABLE`` is recovered).
            message: what failed (logged).
            peer: the instance (or inbox address) that was lost, "" when unknown; it becomes a suspect.
            emitted: tokens already produced, in order.

        Returns:
            The new attempt's queue (its offsets count from ``len(emitted)``), or ``None``: give up.
        """
        if code != pb.UNAVAILABLE or self.attempt is None:
            return None
        gw = self.gw
        self._suspect(peer)
        # The current attempt produced nothing yet (the first one, or a migration that failed
        # before its first token): planning it again is a retry. Otherwise the tokens produced
        # so far move with the request: a migration.
        if len(emitted) == self._base:
            if self.retries >= gw.cfg.retry_max:
                logger.warning("request %s: %s; not retried (EPD_RETRY_MAX=%d used)", self.rid, message,
                               gw.cfg.retry_max)
                return None
            self.retries += 1
            kind, rid = "retry", self._next_id("r")
        else:
            if self.migrations >= gw.cfg.migration_max:
                logger.warning("request %s: %s after %d token(s); not migrated (EPD_MIGRATION_MAX=%d used)",
                               self.rid, message, len(emitted), gw.cfg.migration_max)
                return None
            self.migrations += 1
            kind, rid = "migration", self._next_id("m")
        prompt = Prompt(self.prompt.token_ids + list(emitted), self.prompt.images) if emitted else self.prompt
        self._base = len(emitted)
        gw.end_attempt(self.attempt, f"replaced by {rid}: {message}")
        gw.metrics.recoveries.labels(kind).inc()
        logger.warning("request %s: %s; %s as %s after %d token(s)", self.rid, message, kind, rid, len(emitted))
        try:
            return await self._submit(prompt, self.sampling.max_tokens - len(emitted), rid)
        except ApiError as exc:
            logger.warning("request %s: %s failed: %s", self.rid, kind, exc.message)
            return None

    def _suspect(self, peer: str) -> None:
        """Suspect the life of ``peer`` (id or inbox address) this attempt was sent to — never a
        later one: a stage found gone because it restarted leaves its new life usable."""
        if not peer or self.attempt is None:
            return
        plan = self.attempt.plan
        if peer not in self.attempt.deps:  # an inbox address
            by_inbox = {plan.prefill.inbox: plan.prefill.instance_id, plan.decode.inbox: plan.decode.instance_id}
            peer = by_inbox.get(peer, peer)
        if peer in self.attempt.deps:
            self.gw.suspect(peer, self.attempt.deps[peer])

    def started(self) -> None:
        """A token of the current attempt arrived (its encoder and prefill are done)."""
        if self.attempt is not None:
            self.gw.mark_started(self.attempt)

    def end(self, abort_reason: str | None) -> None:
        """Forget the current attempt (aborting it in every stage when ``abort_reason``)."""
        if self.attempt is not None:
            self.gw.end_attempt(self.attempt, abort_reason)
