"""From a request's token stream to the HTTP response: incremental detokenization, stop
strings, metrics, and the JSON body or SSE chunks.

Stop strings are applied here, on the detokenized text (the stages only know token ids):
text that could still become a stop string is held back, so a stop string split across
token batches never reaches the client. On a match the response finishes with
``finish_reason: "stop"`` and the stages are told to abort the request (they free its KV
blocks and queue slots at once instead of generating up to ``max_tokens``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from services.gateway.app import Gateway
from services.gateway.attempts import RequestRun
from services.gateway.protocol import ApiError, ResponseShape
from services.gateway.stream import Detokenizer, StopChecker, TokenStream

logger = logging.getLogger(__name__)


class Generation:
    """One admitted request's output as ``(text, token_ids, finish_reason | None)`` pieces.

    Attributes:
        finish_reason: ``stop`` | ``length`` once finished (``stop`` also on a stop string).
        stopped_early: a stop string matched before the stages finished (they must be aborted).
    """

    def __init__(self, gw: Gateway, run: RequestRun, stream: TokenStream, stops: list[str]) -> None:
        self.gw, self.run, self.stream = gw, run, stream
        self.detok = Detokenizer(gw.prompts.tokenizer)
        self.stops = StopChecker(stops)
        self.finish_reason: str | None = None
        self.stopped_early = False
        self.t_first = 0.0
        self.t_last = 0.0

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
            self.gw.metrics.itl.observe(now - self.t_last)
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
        gw, adm = self.gw, self.run.attempt
        self.t_first = now
        gw.metrics.ttft.observe(now - self.run.t_arrival)
        gw.metrics.transfer_bytes.labels("feature").inc(adm.feature_bytes)
        if not self.stream.done:  # the KV went to decode: whole blocks of the prompt
            n = len(adm.prompt.token_ids)
            bs = adm.plan.decode.capacity.get("block_size", 1) or 1
            per_token = gw.prompts.kv_bytes_per_token(gw.stage_dtype(adm.plan.prefill))
            gw.metrics.transfer_bytes.labels("kv").inc(-(-n // bs) * bs * per_token)

    def close(self, reason: str | None, abort_reason: str | None) -> None:
        """Release the attempt (aborting it in every stage when ``abort_reason``) and record the
        request's end (``reason``: finish reason, abort, error)."""
        m = self.gw.metrics
        self.run.end(abort_reason)
        m.finished.labels(reason or "abort").inc()
        n = len(self.stream.token_ids)
        m.generation_tokens.inc(n)
        if self.finished:
            m.e2e.observe(self.t_last - self.run.t_arrival)
            if n > 1:
                m.tpot.observe((self.t_last - self.t_first) / (n - 1))


async def respond(request: web.Request, gw: Gateway, run: RequestRun, stream: TokenStream, shape: ResponseShape,
                  stops: list[str], streaming: bool, return_token_ids: bool, headers: dict[str, str]):
    """Run ``run`` to the end and answer: JSON body, or SSE chunks ending with ``data: [DONE]``.

    Whatever happens (finish, stop string, failure, client gone, handler cancelled), the
    in-flight charges are released, and unless every stage finished by itself the request is
    aborted in every stage of its current attempt. A client that goes away counts as
    ``finish_reason="abort"``, a failure as ``error``.
    """
    gen = Generation(gw, run, stream, stops)
    outcome = "error"
    try:
        if streaming:
            resp = await _stream(request, gw, gen, shape, return_token_ids, headers)
        else:
            resp = await _full(gen, shape, return_token_ids, headers)
        outcome = gen.finish_reason or "error"
        return resp
    except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
        logger.info("request %s: client disconnected", run.rid)
        outcome = "abort"
        raise
    finally:
        abort = None
        if not stream.done or gen.stopped_early:
            abort = "stop string matched" if gen.stopped_early else "gateway: request ended early"
        gen.close(outcome, abort)


async def _full(gen: Generation, shape: ResponseShape, return_token_ids: bool, headers) -> web.Response:
    parts = []
    while (piece := await gen.next()) is not None:
        parts.append(piece[0])
    body = shape.full("".join(parts), gen.finish_reason, gen.run.prompt.token_ids, gen.stream.token_ids,
                      return_token_ids)
    return web.json_response(body, headers=headers)


async def _stream(request: web.Request, gw: Gateway, gen: Generation, shape: ResponseShape,
                  return_token_ids: bool, headers) -> web.StreamResponse:
    piece = await gen.next()  # an error before the first byte is a normal error response
    resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    if shape.chat:
        await resp.write(shape.chunk(None, None, role=True))
    try:
        while piece is not None:
            text, ids, finish = piece
            if text or finish or return_token_ids:  # nothing to say yet: held-back text only
                await resp.write(shape.chunk(text, finish, ids if return_token_ids else None))
                gw.metrics.egress.observe(time.perf_counter() - gen.stream.received_at)
            piece = await gen.next()
    except ApiError as exc:  # failure after the headers went out: an error event, then [DONE]
        logger.warning("request %s: failed mid-stream: %s", gen.run.rid, exc.message)
        gw.metrics.errors.labels(str(exc.status)).inc()
        await resp.write(f"data: {json.dumps(exc.body())}\n\n".encode())
    if shape.include_usage:
        await resp.write(shape.usage_chunk(len(gen.run.prompt.token_ids), len(gen.stream.token_ids)))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
