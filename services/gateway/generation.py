"""A request's output at the gateway, from admission to its last piece of text (no HTTP here).

:meth:`Generation.start` admits a request (:class:`~services.gateway.attempts.RequestRun`: plan,
submit, retry an unreachable stage); :meth:`Generation.next` turns its token stream into text
pieces (:class:`~services.gateway.stream.TokenStream`, incremental detokenization, stop strings)
and records the latency and transfer metrics; :meth:`Generation.close` releases it. The HTTP
layer (:func:`services.gateway.responder.respond`) writes the pieces as a JSON body or SSE chunks.

Stop strings are applied here, on the detokenized text (the stages only know token ids):
text that could still become a stop string is held back, so a stop string split across
token batches never reaches the client. On a match the request finishes with
``finish_reason: "stop"`` and the stages are told to abort it (they free its KV blocks and
queue slots at once instead of generating up to ``max_tokens``).
"""

from __future__ import annotations

import time

from epd.wire.gen import epd_pb2 as pb
from services.gateway.attempts import RequestRun
from services.gateway.core import GatewayCore
from services.gateway.prompt import Prompt
from services.gateway.stream import Detokenizer, StopChecker, TokenStream


class Generation:
    """One admitted request's output as ``(text, token_ids, finish_reason | None)`` pieces.

    Build with :meth:`start`.

    Attributes:
        finish_reason: ``stop`` | ``length`` once finished (``stop`` also on a stop string).
        stopped_early: a stop string matched before the stages finished (they must be aborted).
        t_first, t_last: ``time.perf_counter()`` of the first and the latest token batch (0: none yet).
    """

    def __init__(self, core: GatewayCore, run: RequestRun, stream: TokenStream, stops: list[str]) -> None:
        self.core, self.run, self.stream = core, run, stream
        self.detok = Detokenizer(core.prompts.tokenizer)
        self.stops = StopChecker(stops)
        self.finish_reason: str | None = None
        self.stopped_early = False
        self.t_first = 0.0
        self.t_last = 0.0

    @classmethod
    async def start(cls, core: GatewayCore, rid: str, sampling: pb.SamplingParams, prompt: Prompt,
                    t_arrival: float, stops: list[str]) -> Generation:
        """Admit a request: plan its route, send it into the pipeline, open its token stream.

        Args:
            core: the gateway core.
            rid: the client-visible request id.
            sampling: sampling parameters; ``max_tokens`` is the whole budget (:meth:`GatewayCore.max_tokens`).
            prompt: token ids and images.
            t_arrival: ``time.perf_counter()`` when the request arrived (TTFT counts from it).
            stops: stop strings (non-empty ones apply).

        The stream fails with 504 after ``EPD_REQUEST_TIMEOUT_S`` from now.

        Raises:
            ApiError: 503/429 no usable instance, or 503 every retry of an unreachable stage
                failed; nothing is left in flight then.
        """
        run = RequestRun(core, rid, sampling, prompt, t_arrival)
        try:
            queue = await run.start()
        except BaseException:
            run.end("gateway: request not admitted")
            raise
        stream = TokenStream(queue, deadline=time.monotonic() + core.cfg.request_timeout_s, recover=run.recover)
        return cls(core, run, stream, stops)

    @property
    def rid(self) -> str:
        """The client-visible request id."""
        return self.run.rid

    @property
    def route(self) -> str:
        """The current attempt's route (``text`` | ``encode`` | ``cached`` | ``mixed``)."""
        return self.run.attempt.plan.route

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    async def next(self) -> tuple[str, list[int], str | None] | None:
        """The next piece, or ``None`` after the last. Raises :class:`ApiError` on pipeline failure."""
        if self.finished:
            return None
        ids = await self.stream.next()
        if ids is None:
            return None
        now = time.perf_counter()
        self.run.started()
        if not self.t_first:
            self._on_first_token(now)
        else:
            self.core.metrics.itl.observe(now - self.t_last)
        self.t_last = now
        text = self.detok.add(ids)
        if self.stream.done:
            text += self.detok.finish()
        text, matched = self.stops.feed(text)
        if matched:
            self.finish_reason, self.stopped_early = "stop", not self.stream.done
        elif self.stream.done:
            text += self.stops.flush()
            self.finish_reason = self.stream.finish_reason or "stop"
        return text, ids, self.finish_reason

    def _on_first_token(self, now: float) -> None:
        core, adm = self.core, self.run.attempt
        self.t_first = now
        core.metrics.ttft.observe(now - self.run.t_arrival)
        core.metrics.transfer_bytes.labels("feature").inc(adm.feature_bytes)
        if not self.stream.done:  # the KV went to decode: whole blocks of the prompt
            n = len(adm.prompt.token_ids)
            bs = adm.plan.decode.capacity.get("block_size", 1) or 1
            per_token = core.prompts.kv_bytes_per_token(core.stage_dtype(adm.plan.prefill))
            core.metrics.transfer_bytes.labels("kv").inc(-(-n // bs) * bs * per_token)

    def close(self, outcome: str | None) -> None:
        """Release the attempt and record the request's end (``outcome``: its finish reason,
        ``abort`` when the client went away, ``error``). Unless every stage finished by itself,
        the request is aborted in every stage of its current attempt."""
        abort = None
        if not self.stream.done or self.stopped_early:
            abort = "stop string matched" if self.stopped_early else "gateway: request ended early"
        m = self.core.metrics
        self.run.end(abort)
        m.finished.labels(outcome or "abort").inc()
        n = len(self.stream.token_ids)
        m.generation_tokens.inc(n)
        if self.finished:
            m.e2e.observe(self.t_last - self.run.t_arrival)
            if n > 1:
                m.tpot.observe((self.t_last - self.t_first) / (n - 1))
