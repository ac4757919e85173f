"""Instance-level load balancing and routes with several instances per role (2E/1P/2D).

40 concurrent multi-image requests (distinct images, so every one is encoded) spread over
both encoders and both decode instances (none gets more than 70 %), and every greedy output
equals HF ``model.generate``. Then: a repeated request takes the cached route, and a decode
instance whose heartbeat expired is never chosen again.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request

import pytest

from tests.e2e.cluster import start_cluster
from tests.e2e.http import png_data_url
from tests.model_fixtures import sample_photos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

N_REQUESTS = 40
MAX_NEW = 8
PROMPT = "Compare these pictures."


def _requests():
    """40 requests of 2-3 distinct crops of the sample photos (distinct bytes: no cache hits)."""
    photos = sample_photos()
    names = sorted(photos)
    out = []
    for i in range(N_REQUESTS):
        images = []
        for j in range(2 + i % 2):
            src = photos[names[(i + j) % 3]]
            w, h = 84 + 28 * ((i + j) % 4), 84 + 28 * ((i * 3 + j) % 3)
            x, y = (i * 11 + j * 5) % (src.width - w), (i * 7 + j * 13) % (src.height - h)
            images.append(src.crop((x, y, x + w, y + h)))
        out.append(images)
    return out


@pytest.fixture(scope="module")
def workload():
    return _requests()


@pytest.fixture(scope="module")
def reference(hf_reference, workload):
    return [hf_reference.greedy(images, PROMPT, MAX_NEW)[1] for images in workload]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_url, tiny_model):
    db = redis_url.rsplit("/", 1)[0] + "/7"
    c = start_cluster(tmp_path_factory.mktemp("routing"), db, tiny_model, encoders=2, decodes=2,
                      extra_env={"EPD_INSTANCE_TTL_S": "2"})
    yield c
    c.stop()


def _metrics(cluster) -> dict[str, float]:
    with urllib.request.urlopen(f"{cluster.url}/metrics") as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(epd_\S+) (\S+)$", text, re.M)}


def _per_instance(metrics, role) -> dict[str, float]:
    pat = re.compile(r'epd_instance_requests_total\{instance="([^"]+)",role="' + role + r'"\}')
    return {m.group(1): v for k, v in metrics.items() if (m := pat.fullmatch(k))}


async def _send(url, images_list):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(images):
        content = [*({"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images),
                   {"type": "text", "text": PROMPT}]
        raw = await client.chat.completions.with_raw_response.create(
            model=None, messages=[{"role": "user", "content": content}], max_tokens=MAX_NEW, temperature=0,
            extra_body={"return_token_ids": True})
        return raw.headers["x-epd-route"], raw.parse().choices[0].token_ids

    try:
        return await asyncio.gather(*(one(images) for images in images_list))
    finally:
        await client.close()


def test_concurrent_requests_spread_and_stay_exact(cluster, workload, reference):
    results = asyncio.run(_send(cluster.url, workload))
    mismatched = [i for i, ((_, got), want) in enumerate(zip(results, reference, strict=True)) if got != want]
    assert not mismatched, f"greedy output differs from generate for requests {mismatched}"
    assert {route for route, _ in results} == {"encode"}
    m = _metrics(cluster)
    for role, want in (("encoder", {"encoder-0", "encoder-1"}), ("decode", {"decode-0", "decode-1"})):
        counts = _per_instance(m, role)
        assert set(counts) == want, counts
        assert max(counts.values()) <= 0.7 * sum(counts.values()), (role, counts)


def test_repeated_request_takes_cached_route(cluster, workload, reference):
    before = _metrics(cluster)
    [(route, ids)] = asyncio.run(_send(cluster.url, [workload[0]]))
    after = _metrics(cluster)
    assert route == "cached" and ids == reference[0]
    assert after["epd_images_encoded_total"] == before["epd_images_encoded_total"]
    assert after["epd_feature_cache_hits_total"] - before["epd_feature_cache_hits_total"] == len(workload[0])


def test_dead_decode_instance_is_never_chosen(cluster, workload, reference):
    cluster.procs["decode-1"].send_signal(signal.SIGKILL)  # no deregistration: only the TTL tells
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{cluster.url}/health") as r:
            if json.loads(r.read())["instances"]["decode"] == 1:
                break
        time.sleep(0.2)
    before = _per_instance(_metrics(cluster), "decode")
    results = asyncio.run(_send(cluster.url, workload[1:7]))
    assert [ids for _, ids in results] == reference[1:7]
    after = _per_instance(_metrics(cluster), "decode")
    assert after["decode-1"] == before["decode-1"] and after["decode-0"] == before["decode-0"] + 6
