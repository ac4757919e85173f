"""``epd bench compare``: bring up several deployments one after the other on this machine, run
the same seeded scenarios against each, and print one table with ratios.

Deployments: our topologies (any ``EPD_TOPOLOGY`` string: ``E-P-D``, ``EP-D``, ``(E-P)-D``,
``EPD``, …), each started with ``epd up`` and its default core split, and ``transformers-serve``
— Hugging Face's own OpenAI-compatible server on the same model directory, run as it ships
(:mod:`epd.bench.hf_serve`), with every core given to its one process.

Scenarios (fixed shapes; ``--num-prompts`` and ``--seed`` apply to all):

- ``decode-heavy``: one 448×336 photo, ~16 text tokens, 256 output tokens (``ignore_eos``),
  16 requests in flight — continuous batching against one request at a time.
- ``sharegpt4o-like``: EPD-Serve's ShareGPT-4o shape (one ~802×652 photo, ~10 text tokens,
  64 output tokens), 6 in flight. Also reports the **encode-bound limit**: N requests ÷ the
  measured time to encode their images in-process on the threads the deployment's encoder gets
  (:func:`encode_seconds`); no deployment can beat it on these cores.
- ``image-reuse``: the same with ``--image-reuse 0.5`` (half the requests repeat an earlier
  image: the cached route skips the encoder).

With ``--sweep-rates a,b,c`` each (deployment, scenario) runs open-loop Poisson arrivals at
every rate instead (no concurrency cap, fresh image content per rate), and the output adds each
one's goodput (the highest rate with ≥ ``--goodput-target`` SLO attainment, interpolated) and,
per scenario, ``attainment-<scenario>.png`` (all deployments on one chart) and
``cdf-<scenario>.png``.

Greedy text is compared request by request with the reference (``transformers serve`` when it
is in the list, else the first deployment): ``same text k/N``. ``ignore_eos`` (ours) lets the
model emit EOS and go on, while ``transformers serve``'s ``min_new_tokens`` masks EOS, so a
request whose greedy path meets EOS before its last token differs from there on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from epd.bench.client import EndpointError
from epd.bench.metrics import goodput_from_sweep
from epd.bench.serve import bench_once, check_run_args, latencies_ms, resolve_model, slo_text, workload_args
from epd.bench.workloads import WorkloadArgs, WorkloadError, build_workload

PEER = "transformers-serve"
SCENARIOS: dict[str, dict] = {
    "decode-heavy": {"dataset_name": "random-mm", "random_input_len": 16, "random_output_len": 256,
                     "random_mm_bucket_config": "{(336, 448, 1): 1.0}", "random_mm_base_items_per_request": 1,
                     "ignore_eos": True, "max_concurrency": 16, "request_rate": math.inf},
    "sharegpt4o-like": {"dataset_name": "sharegpt4o-like", "ignore_eos": True, "max_concurrency": 6,
                        "request_rate": math.inf},
    "image-reuse": {"dataset_name": "sharegpt4o-like", "image_reuse": 0.5, "ignore_eos": True,
                    "max_concurrency": 6, "request_rate": math.inf},
}


@dataclass
class Running:
    """A deployment that is up: its process (group leader), URL and log file."""

    name: str
    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM the process group (services drain), SIGKILL after ``timeout_s``."""
        if self.proc.poll() is not None:
            return
        try:
            group = os.getpgid(self.proc.pid) == self.proc.pid
        except ProcessLookupError:
            group = False

        def send(sig: int) -> None:
            try:
                os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

        send(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            self.proc.wait()


def free_port() -> int:
    from epd.launcher import free_port as _free

    return _free()


def split_deployment(name: str) -> tuple[str, str]:
    """``"E-P-D@float32"`` → ``("E-P-D", "float32")``; no ``@`` → the resolved ``EPD_DTYPE``
    (``auto``: bfloat16 on a CPU with native bf16 GEMMs, as ``epd up`` picks).

    Raises:
        ValueError: an unknown dtype or topology.
    """
    from epd.config import LauncherConfig, load
    from epd.hardware import resolve_dtype
    from epd.topology import parse_topology

    topology, _, dtype = name.partition("@")
    parse_topology(topology)
    cfg = load(LauncherConfig)
    return topology, resolve_dtype(dtype or cfg.dtype, cfg.device)[0]


def start_ours(topology: str, model: Path, log_dir: Path, startup_timeout_s: float) -> Running:
    """``epd up --topology T`` on a free port in its own process group; returns once it serves.
    ``topology`` may carry a dtype, ``T@float32`` (:func:`split_deployment`).

    Raises:
        EndpointError: it exited or was not ready within ``startup_timeout_s``.
    """
    from epd.launcher import gateway_ready
    from epd.topology import file_part, parse_topology

    port = free_port()
    log = log_dir / f"{file_part(topology)}.log"
    shape, dtype = split_deployment(topology)
    env = {**os.environ, "EPD_RESTART": "no", "EPD_DTYPE": dtype}
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "epd.cli", "up", "--topology", shape, "--port", str(port), "--model", str(model)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    run = Running(topology, proc, f"http://127.0.0.1:{port}", log)
    topo = parse_topology(shape)
    want = {r: topo.count(r) for r in ("encoder", "prefill", "decode")}
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EndpointError(f"{topology}: epd up exited ({proc.returncode}); see {log}")
        if gateway_ready(run.url, want):
            return run
        time.sleep(0.5)
    run.stop()
    raise EndpointError(f"{topology}: not ready after {startup_timeout_s:.0f} s; see {log}")


def start_peer_server(model: Path, log_dir: Path, dtype: str, startup_timeout_s: float) -> Running:
    """``transformers serve`` on ``model`` (all cores) via :mod:`epd.bench.hf_serve`."""
    from epd.bench.hf_serve import start_peer, wait_ready

    port = free_port()
    log = log_dir / f"{PEER}.log"
    proc = start_peer(model, port, dtype=dtype, threads=len(os.sched_getaffinity(0)), log_path=log)
    run = Running(PEER, proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(run.url, str(model), startup_timeout_s)
    except Exception:
        run.stop()
        raise
    return run


def encoder_threads(topology: str) -> int:
    """Torch threads the launcher gives the (first) encoder process of ``topology`` here
    (``EPD_TORCH_THREADS`` when the user set it, as ``epd up`` does, else the core split)."""
    from epd.config import LauncherConfig, load
    from epd.cores import split_cores, usable_cores
    from epd.topology import parse_topology

    topo = parse_topology(split_deployment(topology)[0])
    override = load(LauncherConfig).torch_threads
    threads = ([override] * len(topo.processes) if override
               else split_cores([p.roles for p in topo.processes], usable_cores()))
    for spec, n in zip(topo.processes, threads, strict=True):
        if "encoder" in spec.roles:
            return n
    raise ValueError(f"{topology} has no encoder")


def encode_seconds(model: Path, wl: WorkloadArgs, threads: int, dtype: str = "float32") -> float:
    """Seconds to encode every distinct image of the workload in-process, one image per forward,
    on ``threads`` torch threads (after one warm-up forward): the encode-bound floor of a run.

    Runs in a child process so the thread count and the model's memory do not stay with us.
    """
    code = (
        "import base64,io,json,sys,time,torch\n"
        "from PIL import Image\n"
        "from epd.bench.workloads import WorkloadArgs, build_workload\n"
        "from epd.models.qwen2_vl import Qwen2VLAdapter\n"
        "a=json.loads(sys.argv[1]); torch.set_num_threads(a['threads'])\n"
        "ad=Qwen2VLAdapter.load(a['model'], dtype=getattr(torch,a['dtype']))\n"
        "reqs=build_workload(WorkloadArgs(**a['wl']))\n"
        "seen={}\n"
        "for r in reqs:\n"
        "  for u,k in zip(r.images,r.image_keys): seen[k]=u\n"
        "imgs=[Image.open(io.BytesIO(base64.b64decode(u.split(',',1)[1]))).convert('RGB') for u in seen.values()]\n"
        "ad.encode(imgs[:1]) if imgs else None\n"
        "t=time.perf_counter()\n"
        "for im in imgs: ad.encode([im])\n"
        "print(json.dumps({'seconds': time.perf_counter()-t, 'images': len(imgs)}))\n"
    )
    arg = json.dumps({"threads": threads, "model": str(model), "dtype": dtype, "wl": wl.__dict__})
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def scenario_args(base: argparse.Namespace, name: str) -> argparse.Namespace:
    """``base`` flags with scenario ``name``'s shape applied."""
    return argparse.Namespace(**{**vars(base), **SCENARIOS[name]})


def scenario_workload(sargs: argparse.Namespace, scenario: str, model_dir: Path) -> WorkloadArgs:
    """The workload of ``scenario``; each scenario draws its own images (its own ``image_salt``),
    so one scenario's run never warms the feature cache for the next."""
    wl = workload_args(sargs, str(model_dir))
    wl.image_salt += 1000 * list(SCENARIOS).index(scenario)
    return wl


def _same_text(a: list[str], b: list[str]) -> str:
    n = min(len(a), len(b))
    return f"{sum(x == y for x, y in zip(a[:n], b[:n], strict=True))}/{n}" if n else "-"


def print_table(rows: list[dict], peer: str | None) -> None:
    """One line per (scenario, deployment) with ratios to the peer and to the encode-bound limit."""
    cols = ["scenario", "deployment", "req/s", "tok/s", "TTFT p50", "TTFT p90", "TPOT p50", "E2E p50", "errors",
            "req/s ÷ peer", "tok/s ÷ peer", "÷ enc. limit", "same text"]
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    by_key = {(r["scenario"], r["deployment"]): r for r in rows}

    def ratio(r: dict, ref: dict | None, k: str) -> str:
        return f"{r[k] / ref[k]:.2f}×" if ref and ref[k] else "-"

    for r in rows:
        ref = by_key.get((r["scenario"], peer)) if peer else None
        limit = r.get("encode_limit_req_s")
        cells = [r["scenario"], r["deployment"], f"{r['request_throughput']:.3f}", f"{r['output_throughput']:.1f}",
                 f"{r['median_ttft_ms']:.0f}", f"{r['p90_ttft_ms']:.0f}", f"{r['median_tpot_ms']:.1f}",
                 f"{r['median_e2el_ms']:.0f}", str(sum(r["errors_by_status"].values())),
                 ratio(r, ref, "request_throughput"), ratio(r, ref, "output_throughput"),
                 f"{r['request_throughput'] / limit:.2f}" if limit else "-", r.get("same_text", "-")]
        print(" | ".join(cells))


async def _bench(run: Running, args: argparse.Namespace, scenario: str, model_dir: Path,
                 slo, percentiles) -> tuple[dict, list[str]]:
    sargs = scenario_args(args, scenario)
    if run.name == PEER:  # it serves the directory under its path and takes ignore_eos its own way
        model, sargs.ignore_eos_via = str(model_dir), "generation_config"
    else:
        model = await resolve_model(run.url, None)
    wl = scenario_workload(sargs, scenario, model_dir)
    if not args.sweep_rates:
        res, raw = await bench_once(run.url, model, sargs, wl, sargs.request_rate, slo, percentiles,
                                    f"{run.name} {scenario}")
        return res, [r.generated_text for r in raw.records]
    # A sweep is open-loop: Poisson arrivals at each rate, no concurrency cap; the row's figures
    # are those of the highest rate, the sweep and the goodput ride along.
    sargs.max_concurrency = None
    sweep, cdfs = [], {}
    for k, rate in enumerate(args.sweep_rates):
        wl_k = WorkloadArgs(**{**wl.__dict__, "image_salt": wl.image_salt + 1 + k})  # no cache hits across rates
        res, raw = await bench_once(run.url, model, sargs, wl_k, rate, slo, percentiles, f"{run.name} {scenario}")
        sweep.append({"request_rate": rate} | res)
        cdfs[rate] = latencies_ms(raw)
    goodput, how = goodput_from_sweep([(e["request_rate"], e["slo_attainment"]) for e in sweep], args.goodput_target)
    return res | {"sweep": sweep, "goodput": goodput, "goodput_how": how, "cdfs": cdfs}, [
        r.generated_text for r in raw.records]


def sweep_outputs(rows: list[dict], args: argparse.Namespace, slo: dict[str, float], out_dir: Path,
                  model_dir: Path) -> None:
    """Goodput table, ratios between deployments, attainment-vs-rate and TTFT/TPOT CDF plots per scenario."""
    from epd.bench import plots

    print("\nscenario | deployment | goodput (req/s) | how | attainment at " + ", ".join(
        f"{r:g}" for r in args.sweep_rates) + " req/s")
    print("--- | --- | --- | --- | ---")
    for r in rows:
        att = ", ".join(f"{100 * e['slo_attainment']:.0f} %" for e in r["sweep"])
        g = f"{r['goodput']:.3f}" if r["goodput"] is not None else "< lowest rate"
        print(f"{r['scenario']} | {r['deployment']} | {g} | {r['goodput_how']} | {att}")
    for sc in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == sc]
        title = f"{sc} · {model_dir.name} · {len(os.sched_getaffinity(0))} cores · {slo_text(slo)}"
        series = {r["deployment"]: [(e["request_rate"], e["slo_attainment"]) for e in r["sweep"]] for r in mine}
        png = plots.attainment_vs_rate(series, {r["deployment"]: r["goodput"] for r in mine}, args.goodput_target,
                                       title, out_dir / f"attainment-{sc}.png",
                                       {r["deployment"]: r["goodput_how"] for r in mine})
        cdf = plots.latency_cdf({f"{r['deployment']} @ {rate:g}/s": v for r in mine for rate, v in r["cdfs"].items()},
                                f"{sc} · {model_dir.name}: latency CDF", out_dir / f"cdf-{sc}.png")
        print(f"plots: {png} {cdf}")


def main_compare(args: argparse.Namespace) -> int:
    """Entry of ``epd bench compare``; returns the exit code (2: bad input)."""
    deployments = [d.strip() for d in args.deployments.split(",") if d.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    try:
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise WorkloadError(f"unknown scenario(s) {', '.join(unknown)}; expected {', '.join(SCENARIOS)}")
        for d in deployments:
            if d != PEER:
                split_deployment(d)
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            raise WorkloadError(f"--model {model_dir}: not a model directory (no config.json)")
        slo, percentiles = check_run_args(args)
        for s in scenarios:  # fail fast on a bad workload
            build_workload(WorkloadArgs(**{**workload_args(scenario_args(args, s), str(model_dir)).__dict__,
                                           "num_prompts": 1}))
    except (WorkloadError, ValueError) as exc:
        print(f"epd bench compare: {exc}", file=sys.stderr)
        return 2
    peer_dtype = args.peer_dtype if args.peer_dtype != "auto" else split_deployment("EPD")[1]
    out_dir = Path(args.result_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    limits: dict[tuple[str, int, str], float] = {}
    if args.encode_limit:  # measured first, on an idle machine (a deployment that is up skews it)
        for dep in deployments:
            for sc in scenarios:
                if sc == "decode-heavy" or dep == PEER:
                    continue
                key = (sc, encoder_threads(dep), split_deployment(dep)[1])
                if key not in limits:
                    print(f"--- encode-bound limit: {sc} on {key[1]} thread(s), {key[2]}", flush=True)
                    limits[key] = encode_seconds(model_dir, scenario_workload(scenario_args(args, sc), sc, model_dir),
                                                 key[1], key[2])
    rows: list[dict] = []
    texts: dict[tuple[str, str], list[str]] = {}
    for dep in deployments:
        print(f"--- {dep}: starting", flush=True)
        try:
            run = (start_peer_server(model_dir, out_dir / "logs", peer_dtype, args.startup_timeout)
                   if dep == PEER else start_ours(dep, model_dir, out_dir / "logs", args.startup_timeout))
        except (EndpointError, RuntimeError, OSError) as exc:
            print(f"--- {dep}: could not start: {exc}", file=sys.stderr)
            continue
        try:
            for sc in scenarios:
                res, gen = asyncio.run(_bench(run, args, sc, model_dir, slo, percentiles))
                row = {"scenario": sc, "deployment": dep} | res
                key = (sc, encoder_threads(dep), split_deployment(dep)[1]) if dep != PEER else None
                if key in limits:
                    threads = key[1]
                    row["encoder_threads"] = threads
                    row["encode_seconds"] = limits[key]
                    row["encode_limit_req_s"] = args.num_prompts / limits[key]
                rows.append(row)
                texts[(sc, dep)] = gen
                print(f"--- {dep} {sc}: {res['request_throughput']:.3f} req/s, {res['output_throughput']:.1f} tok/s, "
                      f"TTFT p50 {res['median_ttft_ms']:.0f} ms, errors {res['errors_by_status']}", flush=True)
        finally:
            run.stop()
    ref = PEER if PEER in deployments else (deployments[0] if deployments else None)
    for row in rows:
        if ref and (row["scenario"], ref) in texts and row["deployment"] != ref:
            row["same_text"] = _same_text(texts[(row["scenario"], row["deployment"])], texts[(row["scenario"], ref)])
    print()
    print_table(rows, PEER if PEER in deployments else None)
    if args.sweep_rates and rows:
        sweep_outputs(rows, args, slo, out_dir, model_dir)
        for r in rows:
            r.pop("cdfs", None)
    result = {"model": str(model_dir), "num_prompts": args.num_prompts, "seed": args.seed,
              "cores": len(os.sched_getaffinity(0)), "deployments": deployments, "scenarios": scenarios, "rows": rows}
    path = out_dir / (args.result_filename or "compare.json")
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"result: {path}")
    return 0 if rows else 1


def add_compare_parser(sub) -> None:
    """``epd bench compare`` on the ``epd bench`` subparsers."""
    from epd.bench.serve import add_run_args, add_workload_args

    p = sub.add_parser("compare", help="run the same scenarios against several deployments, one table",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (the same for every deployment)")
    p.add_argument("--deployments", default=f"E-P-D,EP-D,(E-P)-D,EPD,{PEER}",
                   help=f"comma-separated topologies (optionally @dtype: E-P-D@float32) and/or {PEER}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    p.add_argument("--peer-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of transformers serve; auto: what EPD_DTYPE=auto picks here (ours: EPD_DTYPE, "
                        "or per deployment as TOPOLOGY@DTYPE, e.g. E-P-D@float32)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for a deployment to come up")
    p.add_argument("--no-encode-limit", dest="encode_limit", action="store_false",
                   help="skip measuring the encode-bound limit")
    add_workload_args(p)
    add_run_args(p)
    p.set_defaults(func=main_compare, num_prompts=12, result_dir="benchmarks/results/compare")
