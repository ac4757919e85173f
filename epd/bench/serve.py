"""``epd bench serve``: drive an OpenAI-compatible chat endpoint (ours, vLLM, SGLang,
``transformers serve``) with a seeded multimodal workload and report what ``vllm bench serve``
reports, plus SLO attainment, the EPD paper's goodput over a rate sweep, routes and errors.

Result JSON (``--save-result``; schema in README "Benchmarking"): the run's settings (``date``,
``backend``, ``label``, ``model_id``, ``tokenizer_id``, ``dataset_name``, ``num_prompts``,
``request_rate``, ``burstiness``, ``max_concurrency``, ``seed``), the figures of
:func:`epd.bench.metrics.compute_metrics`, ``interrupted``/``unfinished``, the load generator's
``dispatch_lag_ms`` percentiles, and with ``--sweep-rates`` a ``sweep`` list (one entry of
figures per rate) plus ``goodput``/``goodput_how``. ``--save-detailed`` adds vLLM's per-request
lists (``input_lens``, ``output_lens``, ``ttfts``, ``itls``, ``generated_texts``, ``errors``).

Exit codes: 0 done; 2 bad input (unreachable endpoint, a model the server does not list, a bad
workload or flag) with one line naming the problem; 130 stopped by Ctrl-C (after writing what
was measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from epd.bench.client import EndpointError, RunConfig, RunResult, run_requests, served_models
from epd.bench.metrics import compute_metrics, goodput_from_sweep, parse_goodput
from epd.bench.workloads import DATASETS, WorkloadArgs, WorkloadError, build_workload

DEFAULT_SLO = ["ttft:2000", "tpot:50"]  # EPD-Serve's SLO (§5): TTFT ≤ 2 s, TPOT ≤ 50 ms


class BenchInputError(ValueError):
    """A flag value the benchmark cannot run with (exit code 2)."""


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (req/s or inf)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 or inf (got {text})")
    return value


def _rates(text: str) -> list[float]:
    rates = [_rate(t) for t in text.split(",") if t.strip()]
    if not rates or any(math.isinf(r) for r in rates):
        raise argparse.ArgumentTypeError("--sweep-rates needs finite rates, e.g. 0.5,1,2")
    return sorted(rates)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The workload flags (shared by ``serve`` and ``compare``); names follow ``vllm bench serve``."""
    p.add_argument("--dataset-name", default="random-mm", choices=DATASETS, help="workload (default random-mm)")
    p.add_argument("--dataset-path", help="jsonl: the file ({prompt, images, max_tokens} per line)")
    p.add_argument("--num-prompts", type=int, default=100, help="measured requests (default 100)")
    p.add_argument("--num-warmups", type=int, default=0, help="warm-up requests sent first, not measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="local tokenizer directory for exact prompt lengths (default: --model "
                                       "when it is a local directory; else lengths count words)")
    p.add_argument("--random-input-len", type=int, default=64, help="random-mm: text tokens per request")
    p.add_argument("--random-output-len", type=int, default=64, help="random-mm: output tokens per request")
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="random-mm: lengths uniform in "
                   "[len·(1-r), len·(1+r)]")
    p.add_argument("--random-mm-base-items-per-request", type=int, default=1, help="random-mm: images per request")
    p.add_argument("--random-mm-num-mm-items-range-ratio", type=float, default=0.0,
                   help="random-mm: image count uniform in [base·(1-r), base·(1+r)]")
    p.add_argument("--random-mm-limit-mm-per-prompt", type=int, default=255, help="random-mm: at most this "
                   "many images per request")
    p.add_argument("--random-mm-bucket-config", default="{(256, 256, 1): 0.5, (720, 1280, 1): 0.5}",
                   help="random-mm: image sizes {(H, W, 1): probability, ...}")
    p.add_argument("--epd-images", type=int, default=4, help="epd-synthetic: images per request (paper: 2/4/6/8)")
    p.add_argument("--output-len", type=int, help="override the dataset's output tokens per request")
    p.add_argument("--image-reuse", type=float, default=0.0, help="fraction of requests that repeat earlier "
                   "images (exercises the cached route)")
    p.add_argument("--image-salt", type=int, default=0, help="changes what every generated image shows (its "
                   "crop), nothing else: a rerun against a live server then misses its feature cache")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Arrival, sampling, SLO and output flags (shared by ``serve`` and ``compare``)."""
    p.add_argument("--request-rate", type=_rate, default=math.inf, help="mean req/s (Poisson when burstiness "
                   "is 1); inf sends all at once (default)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    p.add_argument("--sweep-rates", type=_rates, help="comma-separated rates; reports goodput (highest rate with "
                   "attainment ≥ --goodput-target, interpolated)")
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs, e.g. ttft:2000 tpot:50 (keys ttft, "
                   "tpot, e2el; a sweep defaults to EPD-Serve's ttft:2000 tpot:50)")
    p.add_argument("--goodput-target", type=float, default=0.9, help="attainment that defines goodput (0.9)")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so every request runs to max tokens")
    p.add_argument("--ignore-eos-via", choices=["ignore_eos", "generation_config"], default="ignore_eos",
                   help="how --ignore-eos is sent: vLLM's ignore_eos field, or transformers serve's "
                   "generation_config {min_new_tokens} (it rejects ignore_eos with 422)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--metric-percentiles", default="90,99", help="percentiles reported besides the median")
    p.add_argument("--request-timeout", type=float, default=600.0, help="per-request limit in seconds")
    p.add_argument("--save-result", action="store_true", help="write the result JSON (and PNG plots)")
    p.add_argument("--save-detailed", action="store_true", help="add per-request lists to the JSON")
    p.add_argument("--result-dir", default=".", help="where results go (default .)")
    p.add_argument("--result-filename", help="JSON file name (default: <label>-<rate>qps-<model>-<date>.json)")
    p.add_argument("--label", help="names the deployment in tables and plot titles")
    p.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE", help="stored in the JSON")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def add_serve_parser(sub) -> None:
    """``epd bench serve`` on the ``epd bench`` subparsers."""
    p = sub.add_parser("serve", help="benchmark an OpenAI-compatible endpoint (vllm bench serve's flags)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="server root, e.g. http://127.0.0.1:8000 (default: --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/chat/completions", choices=["/v1/chat/completions"])
    p.add_argument("--backend", default="openai-chat", choices=["openai-chat"], help="request format")
    p.add_argument("--model", help="model id to send (default: the first the server lists)")
    add_workload_args(p)
    add_run_args(p)
    p.set_defaults(func=main_serve)


def workload_args(args: argparse.Namespace, model_dir: str | None) -> WorkloadArgs:
    """The :class:`WorkloadArgs` of parsed flags; the tokenizer defaults to a local model directory."""
    tokenizer = args.tokenizer
    if tokenizer is None and model_dir and (Path(model_dir) / "tokenizer.json").is_file():
        tokenizer = model_dir
    return WorkloadArgs(
        dataset_name=args.dataset_name, num_prompts=args.num_prompts, seed=args.seed, tokenizer=tokenizer,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        random_mm_base_items_per_request=args.random_mm_base_items_per_request,
        random_mm_num_mm_items_range_ratio=args.random_mm_num_mm_items_range_ratio,
        random_mm_limit_mm_per_prompt=args.random_mm_limit_mm_per_prompt,
        random_mm_bucket_config=args.random_mm_bucket_config, epd_images=args.epd_images,
        image_reuse=args.image_reuse, output_len=args.output_len, dataset_path=args.dataset_path,
        image_salt=args.image_salt,
    )


def check_run_args(args: argparse.Namespace) -> tuple[dict[str, float], list[float]]:
    """``(slo, percentiles)`` after checking the run flags.

    Raises:
        BenchInputError: a bad SLO, percentile, concurrency, burstiness or target.
    """
    try:
        slo = parse_goodput(args.goodput or (DEFAULT_SLO if args.sweep_rates else None))
    except ValueError as exc:
        raise BenchInputError(str(exc)) from None
    try:
        percentiles = [float(q) for q in args.metric_percentiles.split(",") if q.strip()]
    except ValueError:
        raise BenchInputError(f"--metric-percentiles {args.metric_percentiles!r}: expected e.g. 90,99") from None
    if any(not 0 < q < 100 for q in percentiles):
        raise BenchInputError("--metric-percentiles must lie in (0, 100)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchInputError(f"--max-concurrency must be ≥ 1 (got {args.max_concurrency})")
    if not args.burstiness > 0:
        raise BenchInputError(f"--burstiness must be > 0 (got {args.burstiness})")
    if not 0 < args.goodput_target <= 1:
        raise BenchInputError("--goodput-target must lie in (0, 1]")
    if args.num_warmups < 0:
        raise BenchInputError("--num-warmups must be ≥ 0")
    return slo, percentiles


def figures(run: RunResult, slo: dict[str, float], percentiles: list[float]) -> dict:
    """:func:`compute_metrics` of a run plus ``interrupted``, ``unfinished`` and dispatch lag."""
    out = compute_metrics(run.records, run.duration_s, slo, tuple(percentiles))
    lag = np.asarray(run.dispatch_lag_s or [0.0]) * 1e3
    out |= {"interrupted": run.interrupted, "unfinished": run.unfinished,
            "median_dispatch_lag_ms": float(np.median(lag)), "p99_dispatch_lag_ms": float(np.percentile(lag, 99))}
    return out


def detailed(run: RunResult) -> dict:
    """vLLM's per-request lists (``--save-detailed``)."""
    recs = run.records
    return {"input_lens": [r.prompt_len for r in recs], "output_lens": [r.output_tokens for r in recs],
            "ttfts": [r.ttft for r in recs], "itls": [r.itl for r in recs], "e2els": [r.latency for r in recs],
            "routes": [r.route for r in recs], "generated_texts": [r.generated_text for r in recs],
            "errors": [r.error for r in recs]}


def latencies_ms(run: RunResult) -> dict[str, list[float]]:
    """TTFT and TPOT (ms) of the successful requests, for CDF plots."""
    ok = [r for r in run.records if r.success]
    return {"ttft": [r.ttft * 1e3 for r in ok], "tpot": [r.tpot * 1e3 for r in ok if r.tpot is not None]}


def print_table(res: dict, title: str = "Serving Benchmark Result") -> None:
    """The run's figures in ``vllm bench serve``'s layout."""
    w = 50
    print(f"{' ' + title + ' ':=^{w}}")
    rows = [("Successful requests:", res["completed"]), ("Failed requests:", res["failed"]),
            ("Benchmark duration (s):", res["duration"]), ("Total input tokens:", res["total_input_tokens"]),
            ("Total generated tokens:", res["total_output_tokens"]),
            ("Request throughput (req/s):", res["request_throughput"])]
    if "request_goodput" in res:
        rows += [("Request goodput (req/s):", res["request_goodput"]),
                 ("SLO attainment (%):", 100 * res["slo_attainment"])]
    rows += [("Output token throughput (tok/s):", res["output_throughput"]),
             ("Total token throughput (tok/s):", res["total_token_throughput"])]
    for label, value in rows:
        print(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}")
    for key, name in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                      ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print(f"{name:-^{w}}")
        for k, v in res.items():
            if k.endswith(f"_{key}_ms") and not k.startswith("std_"):
                stat = k.split("_")[0]
                label = {"mean": "Mean", "median": "Median"}.get(stat, stat.upper())
                print(f"{label + ' ' + key.upper() + ' (ms):':<40}{v:<10.2f}")
    print(f"{'Requests by route:':<40}{json.dumps(res['requests_by_route'])}")
    if res["errors_by_status"]:
        print(f"{'Errors by status:':<40}{json.dumps(res['errors_by_status'])}")
    if res.get("interrupted"):
        print(f"{'Interrupted (Ctrl-C), unfinished:':<40}{res['unfinished']}")
    print("=" * w)


async def resolve_model(base_url: str, model: str | None) -> str:
    """``model`` checked against ``/v1/models`` (or the first listed when ``None``).

    Raises:
        EndpointError: unreachable, nothing listed, or ``model`` not listed.
    """
    listed = await served_models(base_url)
    if model is None:
        if not listed:
            raise EndpointError(f"{base_url}/v1/models lists no model")
        return listed[0]
    if model not in listed:
        # transformers serve lists its HF cache, not the directory it serves: ask the server itself.
        status, message = await probe_model(base_url, model)
        if status != 200:
            raise EndpointError(f"model {model!r} is not served by {base_url} (it lists: {', '.join(listed) or 'none'}"
                                f"; a 1-token request got HTTP {status}: {message})")
    return model


async def probe_model(base_url: str, model: str) -> tuple[int, str]:
    """``(HTTP status, error message)`` of a 1-token chat request naming ``model`` (0: no answer)."""
    import aiohttp

    from epd.bench.client import make_session

    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
    try:
        async with make_session(60) as s, s.post(f"{base_url}/v1/chat/completions", json=body) as resp:
            raw = await resp.read()
            if resp.status == 200:
                return 200, ""
            try:
                err = json.loads(raw).get("error") or json.loads(raw).get("detail") or raw[:120].decode()
            except ValueError:
                err = raw[:120].decode(errors="replace")
            msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return resp.status, msg[:160]
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return 0, str(exc)


async def bench_once(base_url: str, model: str, args: argparse.Namespace, wl: WorkloadArgs, rate: float,
                     slo: dict[str, float], percentiles: list[float], label: str) -> tuple[dict, RunResult]:
    """Warm-ups (if any), then one measured run at ``rate``; returns (figures, raw run)."""
    cfg = RunConfig(base_url=base_url, model=model, request_rate=rate, burstiness=args.burstiness,
                    max_concurrency=args.max_concurrency, seed=args.seed, ignore_eos=args.ignore_eos,
                    ignore_eos_via=args.ignore_eos_via,
                    temperature=args.temperature, timeout_s=args.request_timeout, progress=not args.disable_tqdm)
    if args.num_warmups:
        warm = build_workload(WorkloadArgs(**{**wl.__dict__, "num_prompts": args.num_warmups,
                                              "seed": wl.seed + 7919, "image_salt": wl.image_salt + 97}))
        await run_requests(RunConfig(**{**cfg.__dict__, "request_rate": math.inf}), warm, desc="warm-up")
    requests = build_workload(wl)
    run = await run_requests(cfg, requests, desc=f"{label} @ {rate:g} req/s")
    return figures(run, slo, percentiles), run


def result_path(args: argparse.Namespace, label: str, rate: float, model: str) -> Path:
    """``--result-dir``/``--result-filename`` (vLLM's default name pattern otherwise)."""
    if args.result_filename:
        return Path(args.result_dir) / args.result_filename
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    rate_s = "inf" if math.isinf(rate) else f"{rate:g}"
    return Path(args.result_dir) / f"{label}-{rate_s}qps-{Path(model).name}-{stamp}.json"


def slo_text(slo: dict[str, float]) -> str:
    """``{"ttft": 2000, "tpot": 50}`` → ``"TTFT ≤ 2000 ms, TPOT ≤ 50 ms"``."""
    return ", ".join(f"{k.upper()} ≤ {v:g} ms" for k, v in slo.items()) or "no SLO"


def _json_safe(obj):
    if isinstance(obj, float) and math.isinf(obj):
        return "inf"
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


async def _serve(args: argparse.Namespace) -> int:
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    slo, percentiles = check_run_args(args)
    model = await resolve_model(base_url, args.model)
    wl = workload_args(args, model if Path(model).is_dir() else None)
    build_workload(WorkloadArgs(**{**wl.__dict__, "num_prompts": 1}))  # bad workload input fails here, fast
    label = args.label or "openai-chat"
    head = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": args.backend, "label": label,
        "model_id": model, "tokenizer_id": wl.tokenizer, "base_url": base_url, "dataset_name": args.dataset_name,
        "num_prompts": args.num_prompts, "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "seed": args.seed, "image_reuse": args.image_reuse, "ignore_eos": args.ignore_eos,
        "metadata": dict(kv.split("=", 1) for kv in args.metadata if "=" in kv),
    }
    title = f"{args.dataset_name} · {label} · {Path(model).name}"
    rates = args.sweep_rates or [args.request_rate]
    points, cdfs, sweep = [], {}, []
    result: dict = {}
    interrupted = False
    for k, rate in enumerate(rates):
        wl_k = WorkloadArgs(**{**wl.__dict__, "image_salt": wl.image_salt + k})  # no cache hits across rates
        res, run = await bench_once(base_url, model, args, wl_k, rate, slo, percentiles, label)
        print_table(res, f"{label} @ {rate:g} req/s")
        entry = head | {"request_rate": rate} | res
        if args.save_detailed:
            entry |= detailed(run)
        sweep.append(entry)
        points.append((rate, res.get("slo_attainment", 0.0)))
        cdfs[f"{rate:g} req/s"] = latencies_ms(run)
        interrupted = run.interrupted
        if interrupted:
            break
    if args.sweep_rates:
        result = head | {"request_rate": None, "sweep": sweep, "goodput_target": args.goodput_target,
                         "goodput_slo_ms": slo}
        measured = [(r, a) for (r, a), e in zip(points, sweep, strict=True) if not e["interrupted"]]
        if measured:
            g, how = goodput_from_sweep(measured, args.goodput_target)
            result |= {"goodput": g, "goodput_how": how}
            print(f"goodput ({args.goodput_target:.0%} attainment of {slo_text(slo)}): "
                  + (f"{g:.3f} req/s ({how})" if g is not None else "below the lowest rate measured"))
    else:
        result = sweep[0]
    if args.save_result:
        path = result_path(args, label, rates[0] if len(rates) == 1 else 0.0, model)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(result), indent=2))
        print(f"result: {path}")
        try:
            from epd.bench import plots

            cdf = plots.latency_cdf({f"{label} {k}": v for k, v in cdfs.items()}, f"{title}: latency CDF",
                                    path.with_suffix(".cdf.png"))
            print(f"plot: {cdf}")
            if args.sweep_rates:
                att = plots.attainment_vs_rate({label: points}, {label: result.get("goodput")},
                                               args.goodput_target, f"{title}: attainment of {slo_text(slo)}",
                                               path.with_suffix(".attainment.png"),
                                               {label: result.get("goodput_how", "")})
                print(f"plot: {att}")
        except RuntimeError as exc:  # matplotlib missing: the JSON is still there
            print(f"no plots: {exc}", file=sys.stderr)
    return 130 if interrupted else 0


def main_serve(args: argparse.Namespace) -> int:
    """Entry of ``epd bench serve``; returns the exit code (see the module docstring)."""
    t0 = time.perf_counter()
    try:
        code = asyncio.run(_serve(args))
    except (EndpointError, WorkloadError, BenchInputError, ValueError) as exc:
        print(f"epd bench serve: {exc}", file=sys.stderr)
        return 2
    print(f"(bench wall time {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return code
