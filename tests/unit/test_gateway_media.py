"""Media fetching at the gateway: data: URLs, local files under the allowed directory, remote
URLs from a local aiohttp server on 127.0.0.1 (size and time limits)."""

import asyncio
import base64
import hashlib
import io
import os

import pytest
from aiohttp import web
from PIL import Image

from services.gateway.media import MediaError, MediaFetcher


def _png(w=32, h=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _load(fetcher: MediaFetcher, url: str):
    async def run():
        try:
            return await fetcher.load(url)
        finally:
            await fetcher.close()

    return asyncio.run(run())


def test_data_url():
    img = _load(MediaFetcher(10_000), "data:image/png;base64," + base64.b64encode(_png()).decode())
    assert (img.width, img.height) == (32, 16) and img.mm_hash == hashlib.sha256(_png()).hexdigest()


def test_local_files_only_under_allowed_dir(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    f = MediaFetcher(10_000, allowed_dir=allowed)
    assert _load(f, str(allowed / "a.png")).width == 32
    assert _load(f, f"file://{allowed}/a.png").height == 16
    for bad in (str(tmp_path / "secret.png"), f"{allowed}/../secret.png", str(allowed / "link.png"),
                f"file://{tmp_path}/secret.png"):
        with pytest.raises(MediaError, match="outside the allowed"):
            _load(f, bad)
    with pytest.raises(MediaError, match="not found"):
        _load(f, str(allowed / "missing.png"))
    with pytest.raises(MediaError, match="EPD_ALLOWED_MEDIA_DIR"):
        _load(MediaFetcher(10_000), str(allowed / "a.png"))
    with pytest.raises(MediaError, match="larger than"):
        _load(MediaFetcher(10_000, allowed_dir=allowed, max_bytes=10), str(allowed / "a.png"))


def test_unknown_scheme_and_remote_disabled():
    with pytest.raises(MediaError, match="must be"):
        _load(MediaFetcher(10_000), "ftp://x/a.png")
    with pytest.raises(MediaError, match="EPD_ALLOW_REMOTE_MEDIA"):
        _load(MediaFetcher(10_000), "http://127.0.0.1:9/a.png")


def test_remote_fetch_limits():
    async def slow(_req):
        await asyncio.sleep(2)
        return web.Response(body=_png())

    async def streamed_big(req):
        resp = web.StreamResponse()  # no Content-Length: the limit must hold while reading
        await resp.prepare(req)
        for _ in range(20):
            await resp.write(b"x" * 1024)
        return resp

    def fixed(body: bytes):
        async def handler(_req):
            return web.Response(body=body)

        return handler

    async def run():
        app = web.Application()
        app.router.add_get("/ok.png", fixed(_png()))
        app.router.add_get("/big.png", fixed(b"x" * 50_000))
        app.router.add_get("/streamed.png", streamed_big)
        app.router.add_get("/slow.png", slow)
        app.router.add_get("/text", fixed(b"hello"))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        f = MediaFetcher(10_000, allow_remote=True, max_bytes=10_000, timeout_s=0.5)
        results = {}
        try:
            for name in ("ok.png", "big.png", "streamed.png", "slow.png", "text", "missing"):
                try:
                    results[name] = await f.load(f"{base}/{name}")
                except MediaError as exc:
                    results[name] = str(exc)
        finally:
            await f.close()
            await runner.cleanup()
        return results

    res = asyncio.run(run())
    assert res["ok.png"].width == 32
    assert "larger than 10000 bytes" in res["big.png"]
    assert "larger than 10000 bytes" in res["streamed.png"]
    assert "longer than 0.5 s" in res["slow.png"]
    assert "not a decodable image" in res["text"]
    assert "HTTP 404" in res["missing"]
