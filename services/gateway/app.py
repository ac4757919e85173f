"""OpenAI-compatible HTTP front end (aiohttp): ``/v1/chat/completions``, ``/v1/models``, ``/health``.

Lifecycle of a chat request at the gateway::

    parse + validate ▸ template, tokenize, image hash/size, placeholders ▸ route + instances
      ▸ EncodeRequest(s) to encoder(s) (encode route) and PrefillRequest to prefill
      ▸ TokenDelta stream (first token from prefill, the rest from decode), reordered by offset
      ▸ detokenize incrementally ▸ JSON response or SSE chunks ending with ``data: [DONE]``
      ▸ on error / disconnect / timeout: AbortRequest to every stage involved
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from epd.config import GatewayConfig
from epd.registry.registry import Registry, RegistryError
from epd.wire.gen import epd_pb2 as pb
from epd.wire.sockets import PeerUnavailable, WireTap
from services.gateway.engine_client import EngineClient
from services.gateway.prompt import Prompt, PromptBuilder
from services.gateway.protocol import (
    ApiError,
    ChatCompletionRequest,
    chat_chunk,
    chat_completion,
    new_id,
    usage,
)
from services.gateway.router import NoInstance, Plan, Router
from services.gateway.stream import Detokenizer, TokenStream

logger = logging.getLogger(__name__)

CONFIG_KEY = web.AppKey("config", GatewayConfig)
GATEWAY_KEY = web.AppKey("gateway", object)


class Gateway:
    """State shared by the HTTP handlers."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.model_name = cfg.served_model_name or Path(cfg.model).name
        self.prompts = PromptBuilder(cfg.model)
        self.registry = Registry(cfg.redis_url)
        self.router = Router()
        self.instance_id = cfg.instance_id or f"gateway-{id(self):x}"
        self.client = EngineClient(cfg.host, cfg.port, self.instance_id, tap=WireTap(cfg.wire_tap))
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        self.client.start()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._refresher:
            self._refresher.cancel()
        await self.client.close()

    async def refresh(self) -> None:
        try:
            snapshot = await asyncio.get_running_loop().run_in_executor(None, self.registry.instances)
        except RegistryError as exc:
            logger.warning("registry refresh failed: %s", exc)
            return
        self.router.update(snapshot)

    async def _refresh_loop(self) -> None:
        parent = os.getppid()
        while True:
            await asyncio.sleep(self.cfg.registry_refresh_s)
            await self.refresh()
            if os.getppid() != parent:  # launcher died: shut down instead of lingering
                logger.error("parent process exited, shutting down")
                os.kill(os.getpid(), signal.SIGTERM)

    # -- request handling ----------------------------------------------------------------
    def parse(self, raw: bytes) -> ChatCompletionRequest:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if req.model not in (None, self.model_name, str(self.cfg.model)):
            raise ApiError(404, f"The model `{req.model}` does not exist.", param="model",
                           code="model_not_found")
        return req

    async def submit(self, rid: str, req: ChatCompletionRequest, prompt: Prompt, max_tokens: int) -> Plan:
        """Choose instances and send the request into the pipeline. Raises :class:`ApiError`."""
        await self.refresh_if_empty()
        patches = [im.grid_thw[1] * im.grid_thw[2] for im in prompt.images]
        try:
            plan = self.router.plan(len(prompt.token_ids), max_tokens, patches)
        except NoInstance as exc:
            raise ApiError(503, str(exc), type_="service_unavailable", headers={"Retry-After": "1"}) from None
        now = time.time()
        sampling = pb.SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k),
            has_seed=req.seed is not None, seed=req.seed or 0, ignore_eos=req.ignore_eos,
        )
        items = [pb.ImageItem(mm_hash=im.image.mm_hash, index=im.index, width=im.image.width,
                              height=im.image.height, num_tokens=im.num_tokens, grid_thw=list(im.grid_thw))
                 for im in prompt.images]
        prefill_req = pb.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt.token_ids, images=items, sampling=sampling,
            decode_instance=plan.decode.instance_id, decode_inbox=plan.decode.inbox,
            reply_to=self.client.address, arrival_time=now, deadline=now + self.cfg.request_timeout_s,
        )
        try:
            await self.client.send(plan.prefill.inbox, prefill_req)
            for enc_id, indices in plan.encoders.items():
                enc_items, blobs = [], []
                for i in indices:
                    item = pb.ImageItem()
                    item.CopyFrom(items[i])
                    item.blob_index = len(blobs)
                    enc_items.append(item)
                    blobs.append(prompt.images[i].image.data)
                await self.client.send(self.router.by_id[enc_id].inbox, pb.EncodeRequest(
                    request_id=rid, images=enc_items, prefill_instance=plan.prefill.instance_id,
                    prefill_inbox=plan.prefill.inbox, reply_to=self.client.address,
                ), blobs)
        except PeerUnavailable as exc:
            await self.abort(rid, plan, "gateway could not reach a stage")
            raise ApiError(503, f"stage unreachable: {exc}", type_="service_unavailable",
                           headers={"Retry-After": "1"}) from None
        return plan

    async def refresh_if_empty(self) -> None:
        if not self.router.instances["prefill"] or not self.router.instances["decode"]:
            await self.refresh()

    async def abort(self, rid: str, plan: Plan, reason: str) -> None:
        """Tell every stage of ``plan`` to drop ``rid`` and free what it holds."""
        targets = {plan.prefill.inbox, plan.decode.inbox}
        targets.update(self.router.by_id[e].inbox for e in plan.encoders if e in self.router.by_id)
        for address in targets:
            try:
                await self.client.send(address, pb.AbortRequest(request_id=rid, reason=reason))
            except PeerUnavailable:
                pass


def _max_tokens(gw: Gateway, req: ChatCompletionRequest, prompt_len: int) -> int:
    max_tokens = req.max_completion_tokens or req.max_tokens or gw.cfg.default_max_tokens
    limit = gw.prompts.max_model_len
    if limit and prompt_len + max_tokens > limit:
        if req.max_completion_tokens or req.max_tokens:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
                                f"{max_tokens} in the completion).", param="max_tokens")
        max_tokens = limit - prompt_len
        if max_tokens < 1:
            raise ApiError(400, f"prompt of {prompt_len} tokens fills the context of {limit}", param="messages")
    return max_tokens


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gw: Gateway = request.app[GATEWAY_KEY]
    try:
        req = gw.parse(await request.read())
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(
            None, gw.prompts.build, req.messages, gw.cfg.max_images_per_request, gw.cfg.max_image_pixels
        )
        max_tokens = _max_tokens(gw, req, len(prompt.token_ids))
        rid = new_id("chatcmpl")
        queue = gw.client.open(rid)
        try:
            plan = await gw.submit(rid, req, prompt, max_tokens)
        except ApiError:
            gw.client.close_stream(rid)
            raise
    except ApiError as exc:
        return exc.response()
    stream = TokenStream(queue, deadline=time.monotonic() + gw.cfg.request_timeout_s)
    headers = {"x-epd-route": plan.route, "x-request-id": rid}
    finished = False
    try:
        if req.stream:
            resp = await _stream_response(request, gw, req, rid, prompt, stream, headers)
        else:
            resp = await _full_response(gw, req, rid, prompt, stream, headers)
        finished = True
        return resp
    finally:
        gw.client.close_stream(rid)
        gw.router.release(plan)
        if not (finished and stream.done):
            await gw.abort(rid, plan, "gateway: request ended early")


async def _full_response(gw, req, rid, prompt, stream, headers) -> web.Response:
    detok = Detokenizer(gw.prompts.tokenizer)
    try:
        async for token_ids in stream:
            detok.add(token_ids)
    except ApiError as exc:
        return exc.response()
    body = chat_completion(rid, gw.model_name, detok.text, stream.finish_reason, prompt.token_ids,
                           stream.token_ids, req.return_token_ids)
    return web.json_response(body, headers=headers)


async def _stream_response(request, gw, req, rid, prompt, stream, headers) -> web.StreamResponse:
    try:  # surface an error before the first byte as a normal error response
        first = await stream.first()
    except ApiError as exc:
        return exc.response()
    resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    created = int(time.time())
    detok = Detokenizer(gw.prompts.tokenizer)
    want_ids = req.return_token_ids
    await resp.write(chat_chunk(rid, created, gw.model_name, {"role": "assistant", "content": ""}, None).encode())
    try:
        token_ids = first
        while token_ids is not None:
            delta = detok.add(token_ids)
            finish = stream.finish_reason if stream.done else None
            await resp.write(chat_chunk(rid, created, gw.model_name, {"content": delta}, finish,
                                        token_ids if want_ids else None).encode())
            token_ids = await stream.next()
    except ApiError as exc:
        await resp.write(f"data: {json.dumps(exc.body())}\n\n".encode())
    if req.stream_options and req.stream_options.include_usage:
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": gw.model_name,
               "choices": [], "usage": usage(len(prompt.token_ids), len(stream.token_ids))}
        await resp.write(f"data: {json.dumps(obj)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def list_models(request: web.Request) -> web.Response:
    gw: Gateway = request.app[GATEWAY_KEY]
    return web.json_response({"object": "list", "data": [{
        "id": gw.model_name, "object": "model", "created": 0, "owned_by": "epd-serve",
        "root": str(gw.cfg.model), "max_model_len": gw.prompts.max_model_len,
    }]})


async def health(request: web.Request) -> web.Response:
    gw: Gateway = request.app[GATEWAY_KEY]
    counts = {role: len(v) for role, v in gw.router.instances.items()}
    ready = counts["prefill"] > 0 and counts["decode"] > 0
    return web.json_response({"status": "ok" if ready else "waiting", "instances": counts},
                             status=200 if ready else 503)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPRequestEntityTooLarge as exc:
        return ApiError(413, f"request body too large: {exc.text}").response()
    except web.HTTPException as exc:
        return ApiError(exc.status, exc.reason, type_="invalid_request_error").response()
    except Exception:
        logger.exception("unhandled error on %s", request.path)
        return ApiError(500, "internal server error", type_="internal_error").response()


def make_app(cfg: GatewayConfig) -> web.Application:
    app = web.Application(client_max_size=cfg.max_body_mb << 20, middlewares=[error_middleware])
    gw = Gateway(cfg)
    app[CONFIG_KEY] = cfg
    app[GATEWAY_KEY] = gw

    async def on_startup(_app):
        await gw.start()

    async def on_cleanup(_app):
        await gw.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    return app
