"""``epd up`` with ``EPD_ELASTIC=on`` on 1E-2P-1D (tiny model, thresholds scaled down):

- a burst of image requests queues images past ``EPD_SCALE_UP_QUEUE``: the controller starts
  ``encoder-1`` and never a third (``EPD_ENCODERS_MAX=2``);
- long text outputs crowd decode while prefill idles: a prefill switches to decode in place;
- once idle, the added encoder is retired (drained, not restarted);
- no request fails, every output equals HF ``generate``, and ``/metrics`` counts each action.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from epd.launcher import gateway_ready
from epd.registry.registry import Registry
from tests.conftest import free_port
from tests.e2e.http import png_data_url
from tests.e2e.test_topologies import ROOT, Deployment
from tests.model_fixtures import sample_photos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

IMAGE_REQS = 12
TEXT_REQS = 12
LONG = 48


def _images(burst: int):
    """IMAGE_REQS distinct 448×336 images for burst ``burst`` (distinct bytes: every one is encoded)."""
    photos = sample_photos()
    names = sorted(photos)
    out = []
    for i in range(IMAGE_REQS):
        k = burst * IMAGE_REQS + i
        src = photos[names[k % 3]]
        x, y = (7 * k) % (src.width - 200), (5 * k) % (src.height - 150)
        out.append(src.crop((x, y, x + 200, y + 150)).resize((448, 336)))
    return out


async def _send(url, items):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(images, text, max_new):
        content = [*({"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images),
                   {"type": "text", "text": text}]
        out = await client.chat.completions.create(
            model=None, messages=[{"role": "user", "content": content}], max_tokens=max_new, temperature=0,
            extra_body={"return_token_ids": True})
        return out.choices[0].token_ids

    try:
        return await asyncio.gather(*(one(*item) for item in items))
    finally:
        await client.close()


def _metrics(url) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics") as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(epd_\S+) (\S+)$", text, re.M)}


def _wait(pred, timeout, what, log):
    deadline = time.monotonic() + timeout
    while not pred():
        tail = log.read_text(errors="replace")[-5000:]
        assert time.monotonic() < deadline, f"{what} not seen in {timeout} s:\n{tail}"
        time.sleep(0.3)


def test_elastic_up_scales_encoders_and_switches_roles(tmp_path, redis_url, tiny_model, hf_reference):
    url = redis_url.rsplit("/", 1)[0] + "/12"
    text_items = [([], f"Count slowly from {i} and explain each step.", LONG) for i in range(TEXT_REQS)]
    port, log = free_port(), tmp_path / "up.log"
    env = {**os.environ, "EPD_TORCH_THREADS": "1", "EPD_HEARTBEAT_S": "0.3", "EPD_REGISTRY_REFRESH_S": "0.2",
           "EPD_KV_MEMORY_MB": "64", "EPD_FEATURE_POOL_MB": "64", "EPD_PREFILL_BUFFER_MB": "64",
           "PYTHONUNBUFFERED": "1", "EPD_ELASTIC": "on", "EPD_ELASTIC_PERIOD_S": "0.3", "EPD_ELASTIC_WINDOW": "1",
           "EPD_ENCODERS_MIN": "1", "EPD_ENCODERS_MAX": "2", "EPD_SCALE_UP_QUEUE": "2", "EPD_SCALE_DOWN_IDLE_S": "4",
           "EPD_SWITCH_DECODE_HIGH": "4", "EPD_SWITCH_DECODE_LOW": "1", "EPD_SWITCH_PREFILL_HIGH": "50",
           "EPD_SWITCH_COOLDOWN_S": "60", "EPD_SWITCH_DRAIN_S": "1",
           "EPD_ENCODER_MAX_IMAGES": "1"}  # one image per forward: a burst stays queued long enough to be seen
    cmd = [sys.executable, "-m", "epd.cli", "up", "--topology", "1E-2P-1D", "--port", str(port), "--redis-url", url,
           "--model", str(tiny_model)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    dep = Deployment("1E-2P-1D", f"http://127.0.0.1:{port}", url, proc, log)
    try:
        _wait(lambda: gateway_ready(dep.url, {"encoder": 1, "prefill": 2, "decode": 1}), 180, "ready", log)
        _wait(lambda: "elastic: on" in log.read_text(), 10, "controller start", log)
        sent, got = [], []
        for burst in range(4):  # until a reading catches the queue (bursts of distinct images)
            items = [([im], "Describe the picture.", 4) for im in _images(burst)]
            sent += items
            got += asyncio.run(_send(dep.url, items))
            if "elastic: adding encoder-1" in log.read_text():
                break
        _wait(lambda: "elastic: adding encoder-1" in log.read_text(), 10, "scale-up", log)
        _wait(lambda: gateway_ready(dep.url, {"encoder": 2}), 120, "encoder-1 registered", log)
        for burst in range(4):  # long outputs crowd the decode until a reading sees it (a fast host drains one burst
            # between two readings)
            items = [(imgs, f"{text} (round {burst})", n) for imgs, text, n in text_items]
            sent += items
            got += asyncio.run(_send(dep.url, items))
            if "elastic: switching" in log.read_text():
                break
        reference = [hf_reference.greedy(imgs, text, n)[1] for imgs, text, n in sent]
        assert got == reference, "an output differs from HF generate"
        _wait(lambda: "is now prefill-" in log.read_text(), 30, "role switch", log)
        _wait(lambda: "retired" in log.read_text(), 60, "scale-down", log)
        text = log.read_text()
        assert "elastic: retiring encoder-1" in text and "adding encoder-2" not in text
        roles = sorted(r for i in Registry(url).instances() for r in i.roles if r != "gateway")
        assert roles == ["decode", "decode", "encoder", "prefill"], roles
        m = _metrics(dep.url)
        assert m['epd_elastic_actions_total{action="scale_up",role="encoder"}'] == 1
        assert m['epd_elastic_actions_total{action="scale_down",role="encoder"}'] == 1
        assert m['epd_elastic_actions_total{action="switch",role="prefill>decode"}'] == 1
        assert m["epd_role_switches_total"] == 1
        assert 0 < m['epd_role_switch_last_seconds{phase="migrate"}'] < 5
        assert not any(k.startswith("epd_request_errors_total") and v for k, v in m.items())
    finally:
        code = dep.stop()
    assert code == 0, log.read_text(errors="replace")[-3000:]
