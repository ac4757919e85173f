"""The OpenAI API as the official ``openai`` client sees it, on a real E→P→D deployment.

One cluster (1E/1P/1D, API key, a local media directory, remote media allowed) serves every
test here. Greedy outputs are compared with HF ``model.generate`` token for token; every
error case asserts status and OpenAI error body and that the next good request succeeds.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

import pytest

from tests.e2e.cluster import start_cluster
from tests.e2e.http import png_data_url
from tests.model_fixtures import sample_photos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "sk-epd-test"
MAX_NEW = 16
PROMPT = "What do these pictures show?"
TEXT_PROMPT = "The garden in spring is"


@pytest.fixture(scope="module")
def photos():
    return sample_photos()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("media")
    for name, im in photos.items():
        im.save(d / f"{name}.png")
    return d


@pytest.fixture(scope="module")
def reference(hf_reference, photos):
    """Greedy HF outputs: chat with astronaut + coffee, chat with chelsea, a raw text prompt."""
    out = {name: hf_reference.greedy([photos[i] for i in images], PROMPT, MAX_NEW)[1]
           for name, images in {"two": ["astronaut", "coffee"], "chelsea": ["chelsea"]}.items()}
    ids = hf_reference.processor.tokenizer(TEXT_PROMPT)["input_ids"]
    out["text_ids"], out["text"] = ids, hf_reference.greedy_ids(ids, MAX_NEW)
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_url, tiny_model, media_dir):
    db = redis_url.rsplit("/", 1)[0] + "/6"
    c = start_cluster(tmp_path_factory.mktemp("openai"), db, tiny_model, extra_env={
        "EPD_API_KEY": KEY, "EPD_ALLOWED_MEDIA_DIR": str(media_dir), "EPD_ALLOW_REMOTE_MEDIA": "1",
        "EPD_MAX_IMAGES_PER_REQUEST": "4", "EPD_MAX_BODY_MB": "8", "EPD_MEDIA_FETCH_TIMEOUT_S": "1"})
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    from openai import OpenAI

    return OpenAI(base_url=f"{cluster.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def media_server(media_dir):
    """A local aiohttp server on 127.0.0.1 serving the media directory (the remote-URL case)."""
    from aiohttp import web

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def serve():
        app = web.Application()
        app.router.add_static("/", media_dir)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        state["runner"] = runner
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    thread.start()
    ready.wait(10)
    yield state["url"]
    asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


def _content(urls, text=PROMPT):
    return [*({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": text}]


def _metrics(cluster) -> dict[str, float]:
    with urllib.request.urlopen(f"{cluster.url}/metrics") as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(epd_\S+) (\S+)$", text, re.M)}


def _chat(client, urls, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": _content(urls)}],
        max_tokens=MAX_NEW, temperature=0, extra_body={"return_token_ids": True}, **kw)
    return raw.headers.get("x-epd-route"), raw.parse()


def test_multi_image_data_and_file_urls_match_generate(client, cluster, reference, photos, media_dir):
    route, resp = _chat(client, [png_data_url(photos["astronaut"]), f"file://{media_dir}/coffee.png"])
    choice = resp.choices[0]
    assert choice.token_ids == reference["two"]
    assert choice.finish_reason == ("length" if len(reference["two"]) == MAX_NEW else "stop")
    assert resp.usage.completion_tokens == len(reference["two"])
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.created > 0
    assert resp.system_fingerprint and route == "encode"


def test_second_identical_request_skips_the_encoder(client, cluster, reference, media_dir, media_server):
    before = _metrics(cluster)
    route, resp = _chat(client, [f"{media_server}/astronaut.png", str(media_dir / "coffee.png")])
    after = _metrics(cluster)
    assert route == "cached" and resp.choices[0].token_ids == reference["two"]
    assert after["epd_images_encoded_total"] == before["epd_images_encoded_total"]
    assert after["epd_feature_cache_hits_total"] == before["epd_feature_cache_hits_total"] + 2
    assert after['epd_requests_total{route="cached"}'] >= 1
    route, resp = _chat(client, [f"{media_server}/chelsea.png", str(media_dir / "coffee.png")])
    assert route == "mixed"


def test_async_streaming_with_usage(cluster, reference, photos):
    from openai import AsyncOpenAI

    async def run():
        aclient = AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key=KEY, max_retries=0)
        stream = await aclient.chat.completions.create(
            model=(await aclient.models.list()).data[0].id,
            messages=[{"role": "user", "content": _content([png_data_url(photos["chelsea"])])}],
            max_completion_tokens=MAX_NEW, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"return_token_ids": True})
        chunks = [c async for c in stream]
        await aclient.close()
        return chunks

    chunks = asyncio.run(run())
    ids = [t for c in chunks for ch in c.choices for t in (getattr(ch, "token_ids", None) or [])]
    assert ids == reference["chelsea"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)


def test_stop_string_cuts_output_and_frees_stages(client, cluster, reference, photos):
    _, full = _chat(client, [png_data_url(photos["chelsea"])])
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop and stop in text
    _, cut = _chat(client, [png_data_url(photos["chelsea"])], stop=[stop, "@@never@@"])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=full.model, messages=[{"role": "user", "content": _content([png_data_url(photos["chelsea"])])}],
        max_tokens=MAX_NEW, temperature=0, stop=stop, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == text[: text.index(stop)]
    _wait_idle(cluster)


def test_text_completions_string_and_token_ids(client, reference):
    model = client.models.list().data[0].id
    resp = client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=MAX_NEW, temperature=0,
                                     extra_body={"return_token_ids": True})
    assert resp.object == "text_completion" and resp.choices[0].token_ids == reference["text"]
    by_ids = client.completions.create(model=model, prompt=reference["text_ids"], max_tokens=MAX_NEW,
                                       temperature=0)
    assert by_ids.choices[0].text == resp.choices[0].text
    streamed = client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=MAX_NEW, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == resp.choices[0].text


def test_sampling_with_seed_is_reproducible(client):
    model = client.models.list().data[0].id
    outs = [client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=8, temperature=0.9, top_p=0.9,
                                      seed=1234, extra_body={"top_k": 50}).choices[0].text for _ in range(2)]
    assert outs[0] == outs[1]


def _wait_idle(cluster, timeout=15.0):
    reg = cluster.registry
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [dec], [pre] = reg.instances("decode"), reg.instances("prefill")
        if (dec.load["free_blocks"] == dec.load["total_blocks"] and dec.load["running"] == 0
                and pre.load["queued_requests"] == 0):
            return
        time.sleep(0.2)
    raise AssertionError(f"stages still hold the request: decode {dec.load}, prefill {pre.load}")


def test_client_disconnect_mid_stream_frees_every_stage(cluster, photos):
    body = {"messages": [{"role": "user", "content": _content([png_data_url(photos["astronaut"])])}],
            "max_tokens": 3000, "ignore_eos": True, "temperature": 0, "stream": True}
    req = urllib.request.Request(f"{cluster.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = urllib.request.urlopen(req, timeout=60)
    for _ in range(6):
        assert resp.readline()
    resp.close()  # the client goes away while decode is generating
    # the gateway notices at its next write; only then can the stages' published loads be trusted
    # to show the request gone (a load published before the request reached decode also reads idle)
    deadline = time.monotonic() + 15.0
    while not ("client disconnected" in cluster.log("gateway") or "ended early" in cluster.log("gateway")):
        assert time.monotonic() < deadline, "the gateway never logged the client's disconnect"
        time.sleep(0.1)
    time.sleep(1.5)  # one heartbeat: loads published after the abort
    _wait_idle(cluster)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` with a tiny (never decoded) IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _raw(cluster, body, key=KEY) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{cluster.url}/v1/chat/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def _user(content):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4}


def _image_body(data: bytes):
    import base64

    return _user(_content(["data:image/png;base64," + base64.b64encode(data).decode()]))


def _bad_cases(photos):
    import base64
    import io

    buf = io.BytesIO()
    photos["astronaut"].save(buf, format="PNG")
    png = buf.getvalue()
    small = png_data_url(photos["astronaut"].resize((28, 28)))
    return {
        "malformed_json": (b'{"messages": [', None, 400, None),
        "wrong_type": ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, None, 400,
                       "max_tokens"),
        "wrong_role": (_user("x") | {"messages": [{"role": "robot", "content": "x"}]}, None, 400, None),
        "unknown_model": (_user("x") | {"model": "gpt-4o"}, None, 404, "model"),
        "n_two": (_user("x") | {"n": 2}, None, 400, "n"),
        "non_image": (_image_body(b"hello world, not an image"), None, 400, None),
        "truncated": (_image_body(png[: len(png) // 2]), None, 400, None),
        "too_many_pixels": (_image_body(_png_header_only(8000, 6000)), None, 400, None),
        "bomb": (_image_body(_png_header_only(100_000, 100_000)), None, 400, None),
        "too_many_images": (_user(_content([small] * 5)), None, 400, None),
        "over_context": (_user("x") | {"max_tokens": 40_000}, None, 400, "max_tokens"),
        "outside_media_dir": (_user(_content(["/etc/hostname"])), None, 400, None),
        "remote_404": (_user(_content(["http://127.0.0.1:9/none.png"])), None, 400, None),
        "missing_key": (_user("x"), "", 401, None),
        "wrong_key": (_user("x"), "sk-wrong", 401, None),
        "body_too_large": (json.dumps(_user("x" * (9 << 20))).encode(), None, 413, None),
        "bad_base64": (_user(_content(["data:image/png;base64," + base64.b64encode(png).decode()[:-3] + "@@"])),
                       None, 400, None),
    }


BAD = ["malformed_json", "wrong_type", "wrong_role", "unknown_model", "n_two", "non_image", "truncated",
       "too_many_pixels", "bomb", "too_many_images", "over_context", "outside_media_dir", "remote_404",
       "missing_key", "wrong_key", "body_too_large", "bad_base64"]


@pytest.mark.parametrize("case", BAD)
def test_errors_are_openai_shaped_and_the_next_request_succeeds(cluster, photos, case):
    body, key, want, param = _bad_cases(photos)[case]
    status, _, err = _raw(cluster, body, KEY if key is None else key)
    assert status == want, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    if param:
        assert err["error"]["param"] == param
    status, headers, ok = _raw(cluster, _user("hello"))
    assert status == 200 and ok["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(p.poll() is None for p in cluster.procs.values())


def test_models_health_metrics(client, cluster, tiny_model):
    assert [m.id for m in client.models.list().data] == [tiny_model.name]
    with urllib.request.urlopen(f"{cluster.url}/health") as r:
        assert json.loads(r.read())["instances"] == {"encoder": 1, "prefill": 1, "decode": 1}
    m = _metrics(cluster)
    for name in ("epd_ttft_seconds_count", "epd_tpot_seconds_count", "epd_itl_seconds_count",
                 "epd_e2e_latency_seconds_count", "epd_gateway_ingress_seconds_count"):
        assert m[name] > 0, name
    assert m['epd_transfer_bytes_total{kind="kv"}'] > 0 and m['epd_transfer_bytes_total{kind="feature"}'] > 0
    assert any(k.startswith("epd_instance_load{") for k in m)
