"""In-place role switching (admin ``SwitchRole``, EPD paper §3.4) under load on 1E-2P-1D.

While 16 streaming requests run, prefill-1 switches to decode (offload, migrate with the
language model reused, onload), then back while decode work is in flight on it (the rest
migrates). Every request completes with the greedy tokens of HF ``generate``; the registry and
the gateway's ``/health`` show the roles after each switch; refusals name their reason.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import pytest

from epd.admin import AdminError, switch_role
from tests.e2e.cluster import start_cluster
from tests.e2e.http import png_data_url
from tests.model_fixtures import sample_photos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_NEW = 24
N = 16


def _workload():
    photos = sample_photos()
    names = sorted(photos)
    out = []
    for i in range(N):
        if i % 2:
            out.append(([], f"Tell me a story about the number {i}."))
        else:
            src = photos[names[i % 3]]
            out.append(([src.crop((i, i, 112 + i, 84 + i))], "Describe the picture."))
    return out


@pytest.fixture(scope="module")
def workload():
    return _workload()


@pytest.fixture(scope="module")
def reference(hf_reference, workload):
    return [hf_reference.greedy(images, text, MAX_NEW)[1] for images, text in workload]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_url, tiny_model):
    db = redis_url.rsplit("/", 1)[0] + "/9"
    c = start_cluster(tmp_path_factory.mktemp("switch"), db, tiny_model, encoders=1, prefills=2, decodes=1)
    yield c
    c.stop()


async def _send(url, workload):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(images, text):
        content = [*({"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images),
                   {"type": "text", "text": text}]
        out = await client.chat.completions.create(
            model=None, messages=[{"role": "user", "content": content}], max_tokens=MAX_NEW, temperature=0,
            extra_body={"return_token_ids": True})
        return out.choices[0].token_ids

    try:
        return await asyncio.gather(*(one(images, text) for images, text in workload))
    finally:
        await client.close()


def _health(url) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/health") as r:
        return json.loads(r.read())["instances"]


def _wait_health(url, want: dict[str, int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (got := _health(url)) != {**got, **want}:
        assert time.monotonic() < deadline, f"/health {got}, want {want}"
        time.sleep(0.2)


def _admin(cluster, instance_id: str) -> str:
    return next(i.admin for i in cluster.registry.instances() if i.instance_id == instance_id)


def _switch_under_load(cluster, workload, instance_id, from_role, to_role, delay_s=0.3):
    """Send the workload; ``delay_s`` into it, switch ``instance_id``; returns (tokens, reply)."""
    reply = {}

    def switch():
        time.sleep(delay_s)
        reply["r"] = switch_role(_admin(cluster, instance_id), from_role, to_role, drain_timeout_s=0.5)

    t = threading.Thread(target=switch)
    t.start()
    tokens = asyncio.run(_send(cluster.url, workload))
    t.join(120)
    return tokens, reply["r"]


def test_prefill_switches_to_decode_and_back_under_load(cluster, workload, reference):
    tokens, r = _switch_under_load(cluster, workload, "prefill-1", "prefill", "decode")
    assert r.ok, r.message
    assert r.weights_reused and r.instance_id == "prefill-1-as-decode"
    assert r.offload_s > 0 and r.migrate_s > 0 and r.onload_s > 0
    assert [s.role for s in r.roles] == ["decode"] and r.roles[0].state == "serving"
    assert tokens == reference, "a request lost tokens or diverged across the switch"
    roles = {i.instance_id: i.roles for i in cluster.registry.instances()}
    assert roles.get("prefill-1-as-decode") == ["decode"] and "prefill-1" not in roles
    _wait_health(cluster.url, {"prefill": 1, "decode": 2})

    # back: decode work in flight on it finishes or migrates; nothing fails
    tokens, r = _switch_under_load(cluster, workload, "prefill-1-as-decode", "decode", "prefill", delay_s=1.0)
    assert r.ok, r.message
    assert r.instance_id == "prefill-1" and r.weights_reused
    assert tokens == reference
    _wait_health(cluster.url, {"prefill": 2, "decode": 1})
    log = cluster.log("prefill-1")
    assert "switched prefill -> decode as prefill-1-as-decode" in log
    assert "switched decode -> prefill as prefill-1" in log


def test_refused_switches_say_why(cluster):
    address = _admin(cluster, "prefill-0")
    r = switch_role(address, "prefill", "prefill")
    assert not r.ok and "already hosted" in r.message
    r = switch_role(address, "prefill", "gateway")
    assert not r.ok and "unknown role" in r.message
    with pytest.raises(AdminError, match="NOT_FOUND"):
        switch_role(address, "decode", "prefill")
    assert _health(cluster.url)["prefill"] == 2


def test_epd_switch_command(cluster):
    import subprocess
    import sys

    address = _admin(cluster, "prefill-0")
    cmd = [sys.executable, "-m", "epd.cli", "switch", address]
    refused = subprocess.run([*cmd, "--from", "prefill", "--to", "prefill"], capture_output=True, text=True)
    assert refused.returncode == 1 and "switch refused: role 'prefill' is already hosted here" in refused.stderr
    done = subprocess.run([*cmd, "--from", "prefill", "--to", "decode", "--drain-timeout", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["instance_id"] == "prefill-0-as-decode" and out["weights_reused"]
    assert out["roles"][0]["role"] == "decode" and out["seconds"]["onload"] > 0
    _wait_health(cluster.url, {"prefill": 1, "decode": 2})
    back = subprocess.run([*cmd[:-1], _admin(cluster, "prefill-0-as-decode"), "--from", "decode", "--to", "prefill"],
                          capture_output=True, text=True)
    assert back.returncode == 0, back.stderr
    _wait_health(cluster.url, {"prefill": 2, "decode": 1})
