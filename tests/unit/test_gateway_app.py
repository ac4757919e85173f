"""The gateway application in-process against scripted fake stages (no model runs).

A fake prefill + decode pair registers in a real Redis (its own db) and answers every
PrefillRequest with a scripted token stream; it records what the gateway sends, so the tests
see AbortRequests for stop strings, timeouts and disconnects. Covers 401, 413, 429, 503 and
504, each followed by a good request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import zmq
from aiohttp.test_utils import TestClient, TestServer

from epd.config import GatewayConfig
from epd.registry.registry import InstanceInfo, Registry
from epd.wire.codec import unpack
from epd.wire.gen import epd_pb2 as pb
from epd.wire.sockets import Inbox, Outbox
from services.gateway.http import make_app

pytestmark = pytest.mark.timeout(120)
TEXT = "hello world. The garden STOP here and more words follow after it"


class FakeStages(threading.Thread):
    """Prefill and decode at one inbox: streams ``script`` (one token per delta, ``delay`` apart)."""

    def __init__(self, url: str, script: list[int], delay: float = 0.0, hang: bool = False,
                 free_blocks: int = 1000, fail_after: int | None = None, fail_code: int = pb.UNAVAILABLE) -> None:
        super().__init__(daemon=True)
        self.script, self.delay, self.hang = script, delay, hang
        # first attempt of every request: after `fail_after` tokens, fail it with `fail_code`
        self.fail_after, self.fail_code = fail_after, fail_code
        self.first_len: dict[str, int] = {}  # client request id -> prompt length of its first attempt
        self.ctx = zmq.Context.instance()
        self.inbox = Inbox(self.ctx, "127.0.0.1")
        # deltas are accepted only from the stages a request was sent to: first token as
        # the prefill, the rest as the decode
        self.outbox = {"prefill": Outbox(self.ctx, "fake-p"), "decode": Outbox(self.ctx, "fake-d")}
        self.received: list[tuple[str, object]] = []
        self.aborted: set[str] = set()
        self.registry = Registry(url)
        self.registry.put_instance(InstanceInfo("fake-p", ["prefill"], self.inbox.address,
                                                load={"queued_tokens": 0}), 60)
        self.registry.put_instance(InstanceInfo("fake-d", ["decode"], self.inbox.address,
                                                capacity={"block_size": 16},
                                                load={"running": 0, "free_blocks": free_blocks}), 60)
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._halt.is_set():
            frames = self.inbox.recv(20)
            if frames is None:
                continue
            _, field, msg = unpack(frames[0])
            self.received.append((field, msg))
            if field == "abort_request":
                self.aborted.add(msg.request_id)
            if field == "prefill_request" and not self.hang:
                self._answer(msg)

    def _answer(self, req: pb.PrefillRequest) -> None:
        base = req.request_id.split("-r")[0].split("-m")[0]
        skip = len(req.prompt_token_ids) - self.first_len.setdefault(base, len(req.prompt_token_ids))
        n = min(len(self.script) - skip, req.sampling.max_tokens)
        for i in range(n):
            if req.request_id in self.aborted or self._halt.is_set():
                return
            if self.fail_after is not None and req.request_id == base and i == self.fail_after:
                self.outbox["decode"].send(req.reply_to, pb.RequestFailed(
                    request_id=req.request_id, code=self.fail_code, message="scripted failure", stage="decode"))
                return
            last = i == n - 1
            stage = "prefill" if i == 0 else "decode"
            self.outbox[stage].send(req.reply_to, pb.TokenDelta(
                request_id=req.request_id, token_ids=[self.script[skip + i]], offset=i, finished=last,
                finish_reason="length" if last else "", num_prompt_tokens=len(req.prompt_token_ids),
                stage=stage))
            if self.delay:
                time.sleep(self.delay)
            while frames := self.inbox.recv(0):  # notice aborts while streaming
                _, field, msg = unpack(frames[0])
                self.received.append((field, msg))
                if field == "abort_request":
                    self.aborted.add(msg.request_id)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.registry.r.flushdb()
        self.inbox.close()
        for out in self.outbox.values():
            out.close()


def _db(redis_url: str, n: int) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{n}"


def _cfg(url: str, model, **kw) -> GatewayConfig:
    return GatewayConfig(redis_url=url, model=model, registry_refresh_s=0.1, **kw)


async def _client(cfg: GatewayConfig) -> TestClient:
    client = TestClient(TestServer(make_app(cfg), handler_cancellation=True))
    await client.start_server()
    return client


def _chat(text="hi", **kw):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 64, "temperature": 0, **kw}


@pytest.fixture(scope="module")
def script(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)(TEXT)["input_ids"]


def _assert_error(status, body, want_status, want_type=None):
    assert status == want_status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    if want_type:
        assert body["error"]["type"] == want_type


def test_stop_strings_non_streaming_and_streaming(redis_url, tiny_model, script):
    url = _db(redis_url, 3)
    fake = FakeStages(url, script)

    async def run():
        c = await _client(_cfg(url, tiny_model))
        try:
            r = await c.post("/v1/chat/completions", json=_chat(stop=["STOP"]))
            full = await r.json()
            r2 = await c.post("/v1/chat/completions", json=_chat(stop="STOP", stream=True,
                                                                 stream_options={"include_usage": True}))
            raw = (await r2.read()).decode()
            plain = await (await c.post("/v1/chat/completions", json=_chat())).json()
            comp = await (await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 64, "stop": ["STOP"]}))\
                .json()
            metrics = await (await c.get("/metrics")).text()
            return full, raw, plain, comp, metrics
        finally:
            await c.close()

    try:
        full, raw, plain, comp, metrics = asyncio.run(run())
    finally:
        fake.stop()
    before = TEXT.split("STOP")[0]
    assert plain["choices"][0]["message"]["content"] == TEXT and plain["choices"][0]["finish_reason"] == "length"
    choice = full["choices"][0]
    assert choice["message"]["content"] == before and choice["finish_reason"] == "stop"
    assert full["object"] == "chat.completion" and full["system_fingerprint"] and full["id"].startswith("chatcmpl-")
    assert comp["object"] == "text_completion" and comp["choices"][0]["text"] == before
    events = [e[len("data: "):] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == before
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] < len(script) and chunks[0]["usage"] is None
    stopped = {full["id"], chunks[0]["id"], comp["id"]}
    assert stopped <= fake.aborted  # the stages were told to stop generating
    assert plain["id"] not in fake.aborted
    assert 'epd_requests_finished_total{finish_reason="stop"} 3.0' in metrics
    assert 'epd_requests_total{route="text"} 4.0' in metrics


def test_timeout_504_and_disconnect_abort(redis_url, tiny_model, script):
    url = _db(redis_url, 4)
    fake = FakeStages(url, script * 10, delay=0.05)

    async def run():
        c = await _client(_cfg(url, tiny_model, request_timeout_s=1.0))
        try:
            fake.hang = True
            r = await c.post("/v1/chat/completions", json=_chat())
            timeout = (r.status, await r.json())
            fake.hang = False
            resp = await c.post("/v1/chat/completions", json=_chat(stream=True, max_tokens=500))
            rid = resp.headers["x-request-id"]
            await resp.content.readline()
            resp.close()  # client goes away mid-stream
            for _ in range(100):
                if rid in fake.aborted:
                    break
                await asyncio.sleep(0.02)
            ok = await c.post("/v1/chat/completions", json=_chat(max_tokens=3))
            metrics = await (await c.get("/metrics")).text()
            return timeout, rid, ok.status, metrics
        finally:
            await c.close()

    try:
        timeout, rid, ok_status, metrics = asyncio.run(run())
    finally:
        fake.stop()
    _assert_error(*timeout, 504, "timeout")
    assert rid in fake.aborted
    assert ok_status == 200
    assert 'epd_requests_finished_total{finish_reason="abort"} 1.0' in metrics  # the client that went away


def test_auth_body_limit_and_unavailable(redis_url, tiny_model, script):
    url = _db(redis_url, 5)

    async def run():
        c = await _client(_cfg(url, tiny_model, api_key="sk-test", max_body_mb=1))
        auth = {"Authorization": "Bearer sk-test"}
        out = {}
        try:
            r = await c.post("/v1/chat/completions", json=_chat())
            out["missing_key"] = (r.status, await r.json())
            r = await c.post("/v1/chat/completions", json=_chat(), headers={"Authorization": "Bearer nope"})
            out["wrong_key"] = (r.status, await r.json())
            out["health_open"] = (await c.get("/health")).status
            r = await c.post("/v1/chat/completions", json=_chat(), headers=auth)
            out["none_up"] = (r.status, await r.json(), r.headers.get("Retry-After"))
            fake = FakeStages(url, script, free_blocks=0)
            try:
                await asyncio.sleep(0.3)
                r = await c.post("/v1/chat/completions", json=_chat(), headers=auth)
                out["saturated"] = (r.status, await r.json(), r.headers.get("Retry-After"))
            finally:
                fake.stop()
            fake = FakeStages(url, script)
            try:
                await asyncio.sleep(0.3)
                r = await c.post("/v1/chat/completions", data=b"x" * (2 << 20), headers=auth)
                out["too_large"] = (r.status, await r.json())
                r = await c.post("/v1/chat/completions", json=_chat(max_tokens=3), headers=auth)
                out["ok"] = r.status
            finally:
                fake.stop()
        finally:
            await c.close()
        return out

    out = asyncio.run(run())
    _assert_error(*out["missing_key"], 401)
    _assert_error(*out["wrong_key"], 401)
    assert out["wrong_key"][1]["error"]["code"] == "invalid_api_key"
    assert out["health_open"] == 503  # no instances yet, but no key needed
    _assert_error(*out["none_up"][:2], 503, "service_unavailable")
    assert out["none_up"][2] == "1"
    _assert_error(*out["saturated"][:2], 429)
    assert out["saturated"][2] == "1"
    _assert_error(*out["too_large"], 413)
    assert out["ok"] == 200


def _stream_then_metrics(cfg: GatewayConfig, fake: FakeStages, body: dict) -> tuple[str, str]:
    """One streamed chat request against ``fake``: (raw SSE body, /metrics text); stops ``fake``."""

    async def run():
        c = await _client(cfg)
        try:
            raw = (await (await c.post("/v1/chat/completions", json=body)).read()).decode()
            return raw, await (await c.get("/metrics")).text()
        finally:
            await c.close()

    try:
        return asyncio.run(run())
    finally:
        fake.stop()


@pytest.mark.parametrize("fail_after", [0, 5])
def test_unavailable_stage_is_retried_or_migrated(redis_url, tiny_model, script, fail_after):
    """UNAVAILABLE before the first token: the request is retried; after 5 tokens: migrated
    (prompt + 5 tokens re-prefilled, the budget reduced). The client sees the whole script once."""
    url = _db(redis_url, 6)
    fake = FakeStages(url, script, fail_after=fail_after, delay=0.02)  # tokens reach the gateway in order
    raw, metrics = _stream_then_metrics(_cfg(url, tiny_model), fake, _chat(stream=True, return_token_ids=True))
    chunks = [json.loads(e[len("data: "):]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    assert all("error" not in c for c in chunks), chunks
    ids = [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids") or []]
    assert ids == script[:64]
    kind = "retry" if fail_after == 0 else "migration"
    assert f'epd_request_recoveries_total{{kind="{kind}"}} 1.0' in metrics
    prompts = [m for f, m in fake.received if f == "prefill_request"]
    assert len(prompts) == 2 and prompts[1].request_id.endswith("-r1" if fail_after == 0 else "-m1")
    assert list(prompts[1].prompt_token_ids) == list(prompts[0].prompt_token_ids) + script[:fail_after]
    assert prompts[1].sampling.max_tokens == 64 - fail_after
    assert prompts[0].request_id in fake.aborted  # the replaced attempt was aborted in its stages


def test_unrecoverable_failure_mid_stream_is_an_error_event_and_counted(redis_url, tiny_model, script):
    url = _db(redis_url, 7)
    fake = FakeStages(url, script, fail_after=3, fail_code=pb.INTERNAL, delay=0.02)  # in order
    raw, metrics = _stream_then_metrics(_cfg(url, tiny_model), fake, _chat(stream=True))
    events = [e[len("data: "):] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "internal_error" and "scripted failure" in error["message"]
    assert 'epd_request_errors_total{status="500"} 1.0' in metrics  # counted though the stream had started
    assert 'epd_requests_finished_total{finish_reason="error"} 1.0' in metrics


def test_oversized_text_is_rejected_before_tokenizing(redis_url, tiny_model, script):
    """A 60 MB prompt (under EPD_MAX_BODY_MB=64) is refused from its length alone."""
    import time

    url = _db(redis_url, 8)
    text = "lorem ipsum " * (5 << 20)  # 60 MiB

    async def run():
        c = await _client(_cfg(url, tiny_model))
        try:
            out = {}
            for path, body in (("/v1/chat/completions", _chat(text)),
                               ("/v1/completions", {"prompt": text, "max_tokens": 4})):
                t0 = time.perf_counter()
                r = await c.post(path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
                out[path] = (r.status, await r.json(), time.perf_counter() - t0)
            return out
        finally:
            await c.close()

    out = asyncio.run(run())
    for path, param in (("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")):
        status, body, elapsed = out[path]
        _assert_error(status, body, 400, "invalid_request_error")
        assert body["error"]["param"] == param and "maximum context length" in body["error"]["message"]
        assert elapsed < 20  # tokenizing it took minutes; the bound itself is measured in benchmarks/faults.py
