"""Is ``epd bench serve``'s load generator ever the bottleneck? It drives a stub OpenAI server
(``tests/stub_openai.py``, its own process, answers at once) and reports:

1. **throughput** — streaming requests/s the client sustains with ``--concurrency`` in flight
   (each request streams ``--tokens`` chunks, a usage chunk and ``[DONE]``);
2. **overhead** — one request at a time: client-observed E2E latency p50/p99 (client + stub +
   loopback: an upper bound on the client's own cost per request);
3. **dispatch lag** — at a Poisson ``--rate``: actual send time − scheduled arrival, p50/p99.

Both processes share this machine's cores, so the figures are a floor of what the client can do.

    .venv/bin/python benchmarks/loadgen.py --out benchmarks/results/loadgen.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epd.bench.client import RunConfig, run_requests  # noqa: E402
from epd.bench.workloads import BenchRequest  # noqa: E402
from epd.launcher import free_port  # noqa: E402
from tests.stub_openai import MODEL  # noqa: E402


def _reqs(n: int, tokens: int) -> list[BenchRequest]:
    return [BenchRequest(prompt=f"hello {i}", max_tokens=tokens, prompt_len=2) for i in range(n)]


async def _wait(url: str) -> None:
    import aiohttp

    for _ in range(100):
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/models") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    raise RuntimeError("stub did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8, help="streamed chunks per request")
    ap.add_argument("--rate", type=float, default=200.0, help="Poisson rate for the dispatch-lag phase")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    port = free_port()
    stub = subprocess.Popen([sys.executable, "-m", "tests.stub_openai", "--port", str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(_wait(url))
        cfg = RunConfig(url, MODEL, max_concurrency=a.concurrency, progress=False)
        asyncio.run(run_requests(cfg, _reqs(200, a.tokens)))  # warm-up
        t0 = time.perf_counter()
        thr = asyncio.run(run_requests(cfg, _reqs(a.requests, a.tokens)))
        wall = time.perf_counter() - t0
        ok = sum(r.success for r in thr.records)
        seq = asyncio.run(run_requests(RunConfig(url, MODEL, max_concurrency=1, progress=False), _reqs(500, a.tokens)))
        e2e = np.array([r.latency for r in seq.records]) * 1e3
        lag_run = asyncio.run(run_requests(RunConfig(url, MODEL, request_rate=a.rate, seed=1, progress=False),
                                           _reqs(int(a.rate * 5), a.tokens)))
        lag = np.array(lag_run.dispatch_lag_s) * 1e3
    finally:
        stub.terminate()
        stub.wait(10)
    res = {
        "requests": a.requests, "concurrency": a.concurrency, "tokens_per_request": a.tokens,
        "completed": ok, "streaming_req_per_s": ok / thr.duration_s, "wall_s": wall,
        "sequential_e2e_ms_p50": float(np.median(e2e)), "sequential_e2e_ms_p99": float(np.percentile(e2e, 99)),
        "rate": a.rate, "dispatch_lag_ms_p50": float(np.median(lag)),
        "dispatch_lag_ms_p99": float(np.percentile(lag, 99)),
    }
    print(f"{'streaming requests/s (concurrency ' + str(a.concurrency) + ')':<48}{res['streaming_req_per_s']:>10.0f}")
    print(f"{'one at a time: E2E p50 / p99 (ms, client+stub)':<48}{res['sequential_e2e_ms_p50']:>10.2f} / "
          f"{res['sequential_e2e_ms_p99']:.2f}")
    print(f"{'dispatch lag at ' + f'{a.rate:g}' + ' req/s: p50 / p99 (ms)':<48}{res['dispatch_lag_ms_p50']:>10.3f} / "
          f"{res['dispatch_lag_ms_p99']:.3f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
