"""The EPD paper's role-switching workload (§4, "dynamic role switching"), scaled to this machine:
``--num-prompts`` requests at a fixed rate, the first ``--short`` with short outputs (and an
image: prefill-heavy), the rest text with long outputs (decode-heavy). The same deployment
(``--topology``, default 1E-2P-1D) runs it with ``EPD_ELASTIC=off`` and with ``on``; the
table shows TTFT / TPOT / end-to-end latency of both, the switches made and each switch's
phases (offload, migrate, onload) as the gateway's ``/metrics`` and the launcher's log report.

    .venv/bin/python benchmarks/role_switch.py --model ~/.cache/epd-serve/models/mid-seed0 \\
        --out docs/bench/role-switch-mid.json

Every other ``EPD_*`` variable passes through to ``epd up`` (e.g. ``EPD_DTYPE``). The
controller's thresholds are the ``--switch-*`` flags (a 2-core machine sees smaller queues
than the paper's cluster); they are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from epd.bench.client import RunConfig, run_requests, served_models
from epd.bench.metrics import compute_metrics
from epd.bench.workloads import WorkloadArgs, build_workload
from epd.launcher import gateway_ready

EPD = os.path.join(os.path.dirname(sys.executable), "epd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(args) -> list:
    """``--short`` one-image requests with ``--short-output`` tokens, then text requests with
    ``--long-output`` tokens (seeded, the ``epd bench serve`` generators)."""
    short = build_workload(WorkloadArgs(dataset_name="random-mm", num_prompts=args.short, seed=args.seed,
                                        random_input_len=32, random_output_len=args.short_output,
                                        random_mm_bucket_config="{(448, 448, 1): 1.0}"))
    long = build_workload(WorkloadArgs(dataset_name="random-mm", num_prompts=args.num_prompts - args.short,
                                       seed=args.seed + 1, random_input_len=32, random_output_len=args.long_output,
                                       random_mm_base_items_per_request=0))
    return short + long


def metric_lines(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(epd_(?:elastic|role_switch)\S*) (\S+)$", text, re.M)}


def run_mode(args, elastic: str) -> dict:
    """One deployment with ``EPD_ELASTIC=elastic``: start, warm up, run the workload, stop."""
    port = free_port()
    env = {**os.environ, "EPD_TOPOLOGY": args.topology, "EPD_MODEL": os.path.expanduser(args.model),
           "EPD_GATEWAY_PORT": str(port), "EPD_ELASTIC": elastic, "EPD_RESTART": "no",
           "EPD_ELASTIC_PERIOD_S": str(args.period), "EPD_ELASTIC_WINDOW": str(args.window),
           "EPD_SWITCH_DECODE_HIGH": str(args.switch_decode_high), "EPD_SWITCH_DECODE_LOW": str(args.switch_decode_low),
           "EPD_SWITCH_PREFILL_HIGH": str(args.switch_prefill_high),
           "EPD_SWITCH_PREFILL_LOW": str(args.switch_prefill_low),
           "EPD_SWITCH_COOLDOWN_S": str(args.cooldown), "EPD_SWITCH_DRAIN_S": str(args.switch_drain)}
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"role-switch-{elastic}.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([EPD, "up"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while not gateway_ready(url, {"encoder": 1, "prefill": 1, "decode": 1}):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"epd up did not come up; see {log_path}")
                time.sleep(0.5)
            reqs = workload(args)
            model = asyncio.run(served_models(url))[0]
            cfg = RunConfig(base_url=url, model=model, request_rate=args.request_rate, burstiness=1e6, seed=args.seed,
                            ignore_eos=True, progress=False)
            asyncio.run(run_requests(RunConfig(base_url=url, model=model, ignore_eos=True, progress=False),
                                     reqs[:1] + reqs[-1:]))  # warm-up: one of each kind
            result = asyncio.run(run_requests(cfg, reqs))
            time.sleep(args.period * 2)  # the last switch's state reaches the gateway
            metrics = metric_lines(url)
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    figures = compute_metrics(result.records, result.duration_s, percentiles=(50.0, 90.0))
    long_tpot = sorted(r.tpot for r in result.records[args.short:] if r.tpot is not None)
    events = [ln.split("| ", 1)[-1] for ln in log_path.read_text().splitlines() if "elastic:" in ln]
    errors = sorted({r.error for r in result.records if not r.success})
    return {"elastic": elastic, "failed": sum(not r.success for r in result.records), "errors": errors[:5],
            "duration_s": round(result.duration_s, 2), "metrics": figures, "switch_metrics": metrics,
            "long_tpot_p50_ms": 1000 * long_tpot[len(long_tpot) // 2] if long_tpot else None,
            "events": events, "log": str(log_path)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--topology", default="1E-2P-1D")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--short", type=int, default=10)
    ap.add_argument("--short-output", type=int, default=8)
    ap.add_argument("--long-output", type=int, default=128)
    ap.add_argument("--request-rate", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--period", type=float, default=1.0)
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--switch-decode-high", type=float, default=4.0)
    ap.add_argument("--switch-decode-low", type=float, default=1.0)
    ap.add_argument("--switch-prefill-high", type=float, default=4.0)
    ap.add_argument("--switch-prefill-low", type=float, default=0.5)
    ap.add_argument("--cooldown", type=float, default=10.0)
    ap.add_argument("--switch-drain", type=float, default=2.0)
    ap.add_argument("--modes", default="off,on")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    runs = [run_mode(args, mode) for mode in args.modes.split(",")]
    print(f"\n{args.num_prompts} requests at {args.request_rate:g}/s on {args.topology}: first {args.short} "
          f"one image + {args.short_output} tokens, then text + {args.long_output} tokens")
    print("| EPD_ELASTIC | failed | TTFT p50/p90 ms | TPOT p50/p90 ms | long TPOT p50 ms | E2E p50/p90 s | "
          "duration s | switches | last switch s (offload/migrate/onload) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        m, s = run["metrics"], run["switch_metrics"]
        keys = [f'epd_role_switch_last_seconds{{phase="{p}"}}' for p in ("offload", "migrate", "onload")]
        last = "/".join(f"{s.get(k, float('nan')):.3f}" for k in keys)
        print(f"| {run['elastic']} | {run['failed']} | {m['median_ttft_ms']:.0f}/{m['p90_ttft_ms']:.0f} | "
              f"{m['median_tpot_ms']:.1f}/{m['p90_tpot_ms']:.1f} | {run['long_tpot_p50_ms'] or float('nan'):.1f} | "
              f"{m['median_e2el_ms'] / 1000:.2f}/{m['p90_e2el_ms'] / 1000:.2f} | {run['duration_s']} | "
              f"{s.get('epd_role_switches_total', 0):.0f} | {last if s else '-'} |")
    for run in runs:
        for line in run["events"]:
            print(f"  [{run['elastic']}] {line}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs,
                                              "machine": {"nproc": os.cpu_count()},
                                              "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
    main()
