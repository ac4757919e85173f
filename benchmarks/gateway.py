"""The gateway on the real path (tiny model, 1E/1P/1D as processes): throughput, its own added
latency, and the feature cache's effect on TTFT.

Phases (all seeded):

1. **overhead** — sequential streaming text requests; the gateway's own time per request from
   its Prometheus histograms: *ingress* = HTTP handler start → PrefillRequest handed to ZeroMQ
   (parse, template, tokenize, route, send; the ZeroMQ hop to prefill adds ~0.1 ms on loopback
   and is not included), *egress* = TokenDelta read off the gateway's socket → its SSE chunk
   written.
2. **throughput** — ``--requests`` short text requests (``--max-tokens`` tokens) from
   ``--concurrency`` clients; sustained requests/s, and ingress/egress under that load.
3. **cache** — streaming one-image requests: TTFT with a new image (encoded) vs the same image
   again (cached route: no encoder work, prefill reads the features from the pool).

    .venv/bin/python benchmarks/gateway.py --out benchmarks/results/gateway.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epd.launcher import EmbeddedRedis, ensure_model  # noqa: E402
from tests.e2e.cluster import start_cluster  # noqa: E402

WORDS = (ROOT / "epd/models/corpus/garden.txt").read_text().split()


def histogram(text: str, name: str) -> tuple[float, float, list[tuple[float, float]]]:
    """(sum, count, cumulative buckets) of one Prometheus histogram."""
    s = float(re.search(rf"^{name}_sum (\S+)$", text, re.M).group(1))
    c = float(re.search(rf"^{name}_count (\S+)$", text, re.M).group(1))
    buckets = [(float("inf") if le == "+Inf" else float(le), float(v))
               for le, v in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)]
    return s, c, buckets


def window(before: str, after: str, name: str) -> dict[str, float]:
    """Mean and bucket-interpolated p50/p99 (ms) of the observations between two scrapes."""
    s0, c0, b0 = histogram(before, name)
    s1, c1, b1 = histogram(after, name)
    n = c1 - c0
    if n <= 0:
        return {"n": 0}
    cum = [(le, v1 - v0) for (le, v1), (_, v0) in zip(b1, b0, strict=True)]

    def quantile(q: float) -> float:
        target, prev_le, prev_c = q * n, 0.0, 0.0
        for le, c in cum:
            if c >= target:
                if le == float("inf"):
                    return prev_le * 1e3
                return (prev_le + (le - prev_le) * (target - prev_c) / max(c - prev_c, 1e-9)) * 1e3
            prev_le, prev_c = le, c
        return prev_le * 1e3

    return {"n": int(n), "mean_ms": (s1 - s0) / n * 1e3, "p50_ms": quantile(0.5), "p99_ms": quantile(0.99)}


async def scrape(session, url) -> str:
    async with session.get(f"{url}/metrics") as r:
        return await r.text()


async def chat(session, url, content, max_tokens, stream=False) -> float:
    """Returns seconds to the first content chunk (stream) or to the full response."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    t0 = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        if not stream:
            await r.read()
            return time.perf_counter() - t0
        first = None
        async for line in r.content:
            if first is None and line.startswith(b"data: ") and b'"content": ""' not in line:
                first = time.perf_counter() - t0
        return first


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def photo_variants(n: int, rng: random.Random):
    from PIL import Image
    from skimage import data

    from tests.e2e.http import png_data_url

    src = Image.fromarray(data.astronaut())
    out = []
    for _ in range(n):
        x, y = rng.randrange(0, 64), rng.randrange(0, 64)
        out.append(png_data_url(src.crop((x, y, x + 448, y + 448))))
    return out


async def run(url: str, args) -> dict:
    import aiohttp

    rng = random.Random(args.seed)
    result: dict = {}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        for _ in range(5):  # warm-up
            await chat(s, url, prompt(rng, 8), args.max_tokens, stream=True)
        m0 = await scrape(s, url)
        for _ in range(args.sequential):
            await chat(s, url, prompt(rng, 8), args.max_tokens, stream=True)
        m1 = await scrape(s, url)
        result["overhead_sequential"] = {k: window(m0, m1, f"epd_gateway_{k}_seconds") for k in ("ingress", "egress")}

        queue = [prompt(rng, 8) for _ in range(args.requests)]
        latencies: list[float] = []

        async def worker():
            while queue:
                latencies.append(await chat(s, url, queue.pop(), args.max_tokens, stream=True))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
        m2 = await scrape(s, url)
        result["throughput"] = {
            "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "requests_per_s": args.requests / wall, "ttft_median_ms": statistics.median(latencies) * 1e3,
            **{k: window(m1, m2, f"epd_gateway_{k}_seconds") for k in ("ingress", "egress")},
        }

        images = photo_variants(args.cache_reps, rng)
        cold, warm = [], []
        for img in images:
            content = [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "Describe."}]
            cold.append(await chat(s, url, content, 4, stream=True))
            warm.append(await chat(s, url, content, 4, stream=True))
        m3 = await scrape(s, url)
        hits = float(re.search(r"^epd_feature_cache_hits_total (\S+)$", m3, re.M).group(1))
        result["cache"] = {"reps": args.cache_reps, "ttft_encode_median_ms": statistics.median(cold) * 1e3,
                           "ttft_cached_median_ms": statistics.median(warm) * 1e3, "cache_hits": hits}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model directory (default: tiny preset)")
    ap.add_argument("--sequential", type=int, default=50)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--cache-reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/gateway.json")
    args = ap.parse_args()
    model = ensure_model(args.model)
    redis_srv = EmbeddedRedis()
    tmp = Path(tempfile.mkdtemp(prefix="epd-bench-gw-"))
    cluster = start_cluster(tmp, redis_srv.url, model, extra_env={
        "EPD_WIRE_TAP": "/dev/null", "EPD_LOG_LEVEL": "WARNING"})  # start_cluster always sets a tap
    try:
        result = asyncio.run(run(cluster.url, args))
    finally:
        cluster.stop()
        redis_srv.close()
    result.update(model=str(model), seed=args.seed)
    seq, thr, cache = result["overhead_sequential"], result["throughput"], result["cache"]
    print(f"{'phase':34s}{'mean ms':>10s}{'p50 ms':>10s}{'p99 ms':>10s}{'n':>8s}")
    for label, w in (("ingress (sequential)", seq["ingress"]), ("egress per chunk (sequential)", seq["egress"]),
                     (f"ingress (concurrency {args.concurrency})", thr["ingress"]),
                     (f"egress per chunk (concurrency {args.concurrency})", thr["egress"])):
        print(f"{label:34s}{w['mean_ms']:10.3f}{w['p50_ms']:10.3f}{w['p99_ms']:10.3f}{w['n']:8d}")
    print(f"throughput: {thr['requests_per_s']:.1f} requests/s ({thr['requests']} text requests, "
          f"{thr['max_tokens']} tokens each, concurrency {thr['concurrency']}); "
          f"median TTFT {thr['ttft_median_ms']:.1f} ms")
    print(f"cache: one-image TTFT encode route {cache['ttft_encode_median_ms']:.1f} ms vs cached route "
          f"{cache['ttft_cached_median_ms']:.1f} ms (median of {cache['reps']})")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
