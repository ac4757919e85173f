"""The OpenAI endpoints over the gateway core: ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Request intake happens here (JSON body against the OpenAI schema, model name, image fetch
and checks, chat template and tokenization); the request then goes to the core
(:meth:`services.gateway.generation.Generation.start`) and its output to
:func:`services.gateway.responder.respond`. Errors are raised as
:class:`~services.gateway.protocol.ApiError` and turned into OpenAI-style bodies by the error
middleware in :mod:`services.gateway.http`.
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from epd.wire.gen import epd_pb2 as pb
from services.gateway.core import GatewayCore
from services.gateway.generation import Generation
from services.gateway.media import ImageInput, MediaError, MediaFetcher
from services.gateway.prompt import Prompt, image_urls
from services.gateway.protocol import ApiError, ChatCompletionRequest, CompletionRequest, ResponseShape, new_id
from services.gateway.responder import respond


def _sampling(req, max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0),
        has_seed=req.seed is not None, seed=req.seed or 0,
        stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
    )


class OpenAIServing:
    """The OpenAI HTTP endpoints of one gateway (vLLM's ``OpenAIServingChat`` over its engine client).

    Args:
        core: the gateway core the requests go to.

    Attributes:
        media: fetches and checks ``image_url`` parts (``EPD_MAX_IMAGE_PIXELS``,
            ``EPD_ALLOWED_MEDIA_DIR``, ``EPD_ALLOW_REMOTE_MEDIA``, ``EPD_MAX_IMAGE_MB``,
            ``EPD_MEDIA_FETCH_TIMEOUT_S``); closed by :meth:`close`.
    """

    def __init__(self, core: GatewayCore) -> None:
        self.core = core
        cfg = core.cfg
        self.media = MediaFetcher(cfg.max_image_pixels, cfg.allowed_media_dir, cfg.allow_remote_media,
                                  cfg.max_image_mb << 20, cfg.media_fetch_timeout_s)

    def add_routes(self, app: web.Application) -> None:
        """Register the endpoints on ``app``."""
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)

    async def close(self) -> None:
        """Close the media fetcher's HTTP client session."""
        await self.media.close()

    # -- intake --------------------------------------------------------------------------
    def parse(self, raw: bytes, schema: type[BaseModel]):
        """Validate a JSON body against ``schema``. Raises :class:`ApiError` (400, or 404 unknown model)."""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            req = schema.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
        if req.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported", param="n")
        if req.model not in (None, self.core.model_name, str(self.core.cfg.model)):
            # OpenAI answers an unknown model with 404 (code model_not_found); so do we.
            raise ApiError(404, f"The model `{req.model}` does not exist.", param="model",
                           code="model_not_found")
        return req

    async def fetch_images(self, urls: list[tuple[str, str]]) -> list[ImageInput]:
        """Fetch and check every image of ``(param, url)`` concurrently.

        Raises:
            ApiError: 400 naming the part (``param``) whose image is unusable.
        """
        results = await asyncio.gather(*(self.media.load(url) for _, url in urls), return_exceptions=True)
        for (param, _), res in zip(urls, results, strict=True):
            if isinstance(res, MediaError):
                raise ApiError(400, str(res), param=param)
            if isinstance(res, BaseException):
                raise res
        return results

    async def _serve(self, request: web.Request, req, prompt: Prompt, requested_max: int | None, chat: bool,
                     t_arrival: float) -> web.StreamResponse:
        core = self.core
        max_tokens = core.max_tokens(requested_max, len(prompt.token_ids))
        rid = new_id("chatcmpl" if chat else "cmpl")
        gen = await Generation.start(core, rid, _sampling(req, max_tokens), prompt, t_arrival, req.stop_strings())
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        shape = ResponseShape(chat, rid, core.model_name, include_usage)
        headers = {"x-epd-route": gen.route, "x-request-id": rid}
        return await respond(request, gen, shape, bool(req.stream), req.return_token_ids, headers)

    # -- endpoints -----------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: text and image_url parts, streaming or not."""
        t_arrival = time.perf_counter()
        req: ChatCompletionRequest = self.parse(await request.read(), ChatCompletionRequest)
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        images = await self.fetch_images(image_urls(req.messages, self.core.cfg.max_images_per_request))
        prompt = await asyncio.get_running_loop().run_in_executor(None, self.core.prompts.build, req.messages,
                                                                  images)
        return await self._serve(request, req, prompt, req.max_completion_tokens or req.max_tokens, True, t_arrival)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``: one text prompt (a string or token ids), streaming or not."""
        t_arrival = time.perf_counter()
        req: CompletionRequest = self.parse(await request.read(), CompletionRequest)
        for name, bad in (("echo", req.echo), ("logprobs", req.logprobs is not None),
                          ("best_of", req.best_of not in (None, 1)), ("suffix", req.suffix)):
            if bad:
                raise ApiError(400, f"{name} is not supported", param=name)
        prompt_in = req.prompt
        if isinstance(prompt_in, list) and prompt_in and isinstance(prompt_in[0], (str, list)):
            if len(prompt_in) != 1:
                raise ApiError(400, "only one prompt per request is supported", param="prompt")
            prompt_in = prompt_in[0]
        prompt = await asyncio.get_running_loop().run_in_executor(None, self.core.prompts.build_text, prompt_in)
        return await self._serve(request, req, prompt, req.max_tokens, False, t_arrival)

    async def list_models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: the one served model."""
        core = self.core
        return web.json_response({"object": "list", "data": [{
            "id": core.model_name, "object": "model", "created": 0, "owned_by": "epd-serve",
            "root": str(core.cfg.model), "max_model_len": core.prompts.max_model_len,
        }]})

    async def health(self, request: web.Request) -> web.Response:
        """200 when at least one prefill and one decode instance are registered, else 503."""
        ready, counts = self.core.health()
        return web.json_response({"status": "ok" if ready else "waiting", "instances": counts},
                                 status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format."""
        return web.Response(body=self.core.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
