"""A stub OpenAI chat server that answers at once: the load generator's tests and its throughput
benchmark (``benchmarks/loadgen.py``) run against it.

Every request streams ``max_tokens`` one-word chunks, a usage chunk and ``[DONE]``, with no
delay. Failures are injected by request number ``n`` (1-based, counted per server):
``fail_every=k`` answers every k-th request with HTTP 503 (OpenAI error JSON),
``midstream_every=m`` sends one token then an error event, ``cut_every=c`` sends one token and
closes the connection without ``[DONE]``.

    python -m tests.stub_openai --port 8100 [--fail-every 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

MODEL = "stub-model"


def make_app(fail_every: int = 0, midstream_every: int = 0, cut_every: int = 0,
             hf_style: bool = False, token_delay_s: float = 0.0) -> web.Application:
    """The stub's aiohttp application (see the module docstring for the failure knobs).

    ``hf_style``: end streams as ``transformers serve`` does — the last chunk carries
    ``finish_reason`` and usage, and no ``[DONE]`` follows. ``token_delay_s``: sleep before each
    token (then each token is its own write)."""
    state = {"n": 0}

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        state["n"] += 1
        n = state["n"]
        body = await request.json()
        if body.get("model") not in (None, MODEL):
            return web.json_response({"error": {"message": f"The model `{body['model']}` does not exist.",
                                                "type": "NotFoundError", "param": None, "code": 404}}, status=404)
        if fail_every and n % fail_every == 0:
            return web.json_response({"error": {"message": "stub overloaded", "type": "server_error",
                                                "param": None, "code": None}}, status=503)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-epd-route": "stub"})
        await resp.prepare(request)
        tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        head = {"id": f"c{n}", "object": "chat.completion.chunk", "model": MODEL}
        parts = []
        for i in range(tokens):
            chunk = head | {"choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
            parts.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if token_delay_s:
                await asyncio.sleep(token_delay_s)
                await resp.write(parts.pop())
            if (midstream_every and n % midstream_every == 0) or (cut_every and n % cut_every == 0):
                break
        await resp.write(b"".join(parts))
        if cut_every and n % cut_every == 0:
            request.transport.close()
            return resp
        if midstream_every and n % midstream_every == 0:
            await resp.write(b'data: {"error": {"message": "stub died", "type": "server_error"}}\n\n')
        else:
            choices = [{"index": 0, "delta": {}, "finish_reason": "length"}] if hf_style else []
            usage = head | {"choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": tokens,
                                                          "total_tokens": tokens + 1}}
            await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        if not hf_style:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--midstream-every", type=int, default=0)
    p.add_argument("--cut-every", type=int, default=0)
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds before each token")
    a = p.parse_args()
    web.run_app(make_app(a.fail_every, a.midstream_every, a.cut_every, token_delay_s=a.token_delay),
                host=a.host, port=a.port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
