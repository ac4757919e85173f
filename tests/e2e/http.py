"""Minimal HTTP helpers for the e2e tests (stdlib only)."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user_message(images: list, text: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def post(url: str, body: bytes | dict, timeout: float = 120) -> tuple[int, dict, dict]:
    """POST JSON; returns (status, headers, parsed body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def post_stream(url: str, body: dict, timeout: float = 120) -> tuple[int, list[dict], bool]:
    """POST with stream=true; returns (status, parsed SSE chunks, saw [DONE])."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    chunks, done = [], False
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for raw in resp:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                continue
            chunks.append(json.loads(payload))
        return resp.status, chunks, done
