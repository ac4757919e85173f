"""HTTP endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``.

Errors are raised as :class:`~services.gateway.protocol.ApiError` and turned into OpenAI-style
bodies by the error middleware in :mod:`services.gateway.app`.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from epd.wire.gen import epd_pb2 as pb
from services.gateway.app import GATEWAY_KEY, Gateway
from services.gateway.attempts import RequestRun
from services.gateway.prompt import Prompt, image_urls
from services.gateway.protocol import ApiError, ChatCompletionRequest, CompletionRequest, ResponseShape, new_id
from services.gateway.responder import respond
from services.gateway.stream import TokenStream


def _sampling(req, max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0),
        has_seed=req.seed is not None, seed=req.seed or 0,
        stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
    )


async def _serve(request: web.Request, gw: Gateway, req, prompt: Prompt, requested_max: int | None,
                 chat: bool, t_arrival: float) -> web.StreamResponse:
    max_tokens = gw.max_tokens(requested_max, len(prompt.token_ids))
    rid = new_id("chatcmpl" if chat else "cmpl")
    run = RequestRun(gw, rid, _sampling(req, max_tokens), prompt, t_arrival)
    try:
        queue = await run.start()
    except BaseException:
        run.end("gateway: request not admitted")
        raise
    stream = TokenStream(queue, deadline=time.monotonic() + gw.cfg.request_timeout_s, recover=run.recover)
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    shape = ResponseShape(chat, rid, gw.model_name, include_usage)
    headers = {"x-epd-route": run.attempt.plan.route, "x-request-id": rid}
    return await respond(request, gw, run, stream, shape, req.stop_strings(), bool(req.stream),
                         req.return_token_ids, headers)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: text and image_url parts, streaming or not."""
    t_arrival = time.perf_counter()
    gw: Gateway = request.app[GATEWAY_KEY]
    req: ChatCompletionRequest = gw.parse(await request.read(), ChatCompletionRequest)
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    images = await gw.fetch_images(image_urls(req.messages, gw.cfg.max_images_per_request))
    prompt = await asyncio.get_running_loop().run_in_executor(None, gw.prompts.build, req.messages, images)
    return await _serve(request, gw, req, prompt, req.max_completion_tokens or req.max_tokens, True, t_arrival)


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``: one text prompt (a string or token ids), streaming or not."""
    t_arrival = time.perf_counter()
    gw: Gateway = request.app[GATEWAY_KEY]
    req: CompletionRequest = gw.parse(await request.read(), CompletionRequest)
    for name, bad in (("echo", req.echo), ("logprobs", req.logprobs is not None),
                      ("best_of", req.best_of not in (None, 1)), ("suffix", req.suffix)):
        if bad:
            raise ApiError(400, f"{name} is not supported", param=name)
    prompt_in = req.prompt
    if isinstance(prompt_in, list) and prompt_in and isinstance(prompt_in[0], (str, list)):
        if len(prompt_in) != 1:
            raise ApiError(400, "only one prompt per request is supported", param="prompt")
        prompt_in = prompt_in[0]
    prompt = await asyncio.get_running_loop().run_in_executor(None, gw.prompts.build_text, prompt_in)
    return await _serve(request, gw, req, prompt, req.max_tokens, False, t_arrival)


async def list_models(request: web.Request) -> web.Response:
    gw: Gateway = request.app[GATEWAY_KEY]
    return web.json_response({"object": "list", "data": [{
        "id": gw.model_name, "object": "model", "created": 0, "owned_by": "epd-serve",
        "root": str(gw.cfg.model), "max_model_len": gw.prompts.max_model_len,
    }]})


async def health(request: web.Request) -> web.Response:
    """200 when at least one prefill and one decode instance are registered, else 503."""
    gw: Gateway = request.app[GATEWAY_KEY]
    counts = {role: len(v) for role, v in gw.router.instances.items()}
    ready = counts["prefill"] > 0 and counts["decode"] > 0
    return web.json_response({"status": "ok" if ready else "waiting", "instances": counts},
                             status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    gw: Gateway = request.app[GATEWAY_KEY]
    return web.Response(body=gw.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
