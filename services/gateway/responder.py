"""From a request's :class:`~services.gateway.generation.Generation` to the HTTP response: the
JSON body, or SSE chunks ending with ``data: [DONE]`` (an error after the headers went out
becomes an SSE error event)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from services.gateway.generation import Generation
from services.gateway.protocol import ApiError, ResponseShape

logger = logging.getLogger(__name__)


async def respond(request: web.Request, gen: Generation, shape: ResponseShape, streaming: bool,
                  return_token_ids: bool, headers: dict[str, str]) -> web.StreamResponse:
    """Run ``gen`` to the end and answer: JSON body, or SSE chunks ending with ``data: [DONE]``.

    Whatever happens (finish, stop string, failure, client gone, handler cancelled), the
    request is released (:meth:`Generation.close`: its charges, and an abort in every stage
    unless they all finished). A client that goes away counts as ``finish_reason="abort"``,
    a failure as ``error``.

    Raises:
        ApiError: the pipeline failed before the first byte went out (the error middleware
            answers it).
    """
    outcome = "error"
    try:
        if streaming:
            resp = await _stream(request, gen, shape, return_token_ids, headers)
        else:
            resp = await _full(gen, shape, return_token_ids, headers)
        outcome = gen.finish_reason or "error"
        return resp
    except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
        logger.info("request %s: client disconnected", gen.rid)
        outcome = "abort"
        raise
    finally:
        gen.close(outcome)


async def _full(gen: Generation, shape: ResponseShape, return_token_ids: bool, headers) -> web.Response:
    parts = []
    while (piece := await gen.next()) is not None:
        parts.append(piece[0])
    body = shape.full("".join(parts), gen.finish_reason, gen.run.prompt.token_ids, gen.stream.token_ids,
                      return_token_ids)
    return web.json_response(body, headers=headers)


async def _stream(request: web.Request, gen: Generation, shape: ResponseShape, return_token_ids: bool,
                  headers) -> web.StreamResponse:
    metrics = gen.core.metrics
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
                metrics.egress.observe(time.perf_counter() - gen.stream.received_at)
            piece = await gen.next()
    except ApiError as exc:  # failure after the headers went out: an error event, then [DONE]
        logger.warning("request %s: failed mid-stream: %s", gen.rid, exc.message)
        metrics.errors.labels(str(exc.status)).inc()
        await resp.write(f"data: {json.dumps(exc.body())}\n\n".encode())
    if shape.include_usage:
        await resp.write(shape.usage_chunk(len(gen.run.prompt.token_ids), len(gen.stream.token_ids)))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
