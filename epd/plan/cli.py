"""``epd profile`` and ``epd plan``: argument parsing and entry points.

Exit codes: 0 done; 2 bad input (a missing model directory, an unreadable or invalid
profile, a bad flag value) with one line on stderr naming the problem.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


class PlanInputError(ValueError):
    """A flag value ``epd profile`` / ``epd plan`` cannot run with (exit code 2)."""


def _int_list(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers ≥ 1")
    return out


# ---------------------------------------------------------------------------------- profile
def add_profile_parser(sub) -> None:
    """``epd profile`` on the ``epd`` subparsers."""
    from epd.cores import usable_cores

    cores = usable_cores()
    p = sub.add_parser("profile", help="measure each stage on this device and model; write a profile JSON for "
                                       "epd plan", description=(
        "Measure encode (vs images and patches), prefill (vs packed tokens), decode (vs batch and context) and "
        "transfer (vs bytes) with the engine's own parts on this machine, fit the cost models and write the "
        "profile JSON that epd plan simulates with (device, model, dtype and threads recorded in it)."))
    p.add_argument("--model", help="model directory (HF layout), e.g. ~/.cache/epd-serve/models/tiny-seed0")
    p.add_argument("--refit", metavar="PROFILE.json",
                   help="measure nothing: fit the cost models of this profile again from its stored samples "
                        "(a profile written by an older epd) and write the result to --out")
    p.add_argument("--merge", nargs="+", metavar="PROFILE.json",
                   help="measure nothing: merge these profiles of one model and device (taken at different times) "
                        "into one, each measurement the median over them, and write it to --out")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--dtype", default="auto", help="auto (EPD_DTYPE's rule), float32, bfloat16, float16")
    p.add_argument("--threads", type=_int_list, default=sorted({1, cores}),
                   help=f"torch thread counts to profile (default 1,{cores}: one core and all of them)")
    p.add_argument("--transfer-backend", default=os.environ.get("EPD_TRANSFER_BACKEND") or "shm",
                   choices=["mooncake", "shm"], help="backend whose transfer time is measured (default: "
                   "EPD_TRANSFER_BACKEND, else shm — what epd up uses on cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=3, help="timed runs per sample (median)")
    p.add_argument("--quick", action="store_true", help="fewer samples (smoke tests)")
    p.add_argument("--no-front-end", action="store_true",
                   help="skip the front-end measurement on a running epd up E-P-D (needs redis-server); the "
                   "simulator then uses the synthetic host figures for the gateway and none for the client")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.set_defaults(func=main_profile)


def _refit(args: argparse.Namespace) -> int:
    """``epd profile --refit OLD --out NEW``: the samples of OLD fitted again, and the services'
    overheads derived again against the new fit from the deployment probe's stored runs (no
    measurement)."""
    from epd.plan.profile import Profile, ProfileError

    try:
        prof = Profile.load(Path(args.refit).expanduser())
    except ProfileError as exc:
        print(f"epd profile: {exc}", file=sys.stderr)
        return 2
    new = prof.refitted()
    for stage, per in new.stages.items():
        for t, m in per.items():
            print(f"{stage} ({t} thread{'s' if t > 1 else ''}): median relative error "
                  f"{100 * prof.stages[stage][t].median_rel_err:.1f} % -> {100 * m.median_rel_err:.1f} %")
    if (new.device.get("front_end") or {}).get("runs") and "service" in new.host:
        from epd.plan.calibrate import apply_probe

        new = apply_probe(new)
        print(f"services beyond their forwards: {prof.host['service']} -> {new.host['service']}")
    print(f"wrote {new.save(Path(args.out).expanduser())}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    """``epd profile --merge A B … --out M``: :func:`epd.plan.calibrate.merge` (no measurement)."""
    from epd.plan.calibrate import merge
    from epd.plan.profile import Profile, ProfileError

    try:
        prof = merge([Profile.load(Path(p).expanduser()) for p in args.merge])
    except ProfileError as exc:
        print(f"epd profile: {exc}", file=sys.stderr)
        return 2
    print(summary(prof))
    print(f"wrote {prof.save(Path(args.out).expanduser())} (the median of {len(args.merge)} profiles)")
    return 0


def main_profile(args: argparse.Namespace) -> int:
    """Entry of ``epd profile``."""
    from epd.plan.profiler import Profiler

    t0 = time.perf_counter()
    if args.refit:
        return _refit(args)
    if args.merge:
        return _merge(args)
    try:
        if not args.model:
            raise PlanInputError("--model is required (or --refit PROFILE.json)")
        model = Path(args.model).expanduser()
        if not (model / "config.json").is_file():
            raise PlanInputError(f"--model {args.model}: not a model directory (no config.json)")
        if args.reps < 1:
            raise PlanInputError(f"--reps must be ≥ 1 (got {args.reps})")
        from epd.hardware import resolve_dtype

        try:
            resolve_dtype(args.dtype, "cpu")
        except ValueError as exc:
            raise PlanInputError(f"--dtype: {exc}") from None
    except PlanInputError as exc:
        print(f"epd profile: {exc}", file=sys.stderr)
        return 2
    prof = Profiler(model, args.dtype, args.threads, args.transfer_backend, seed=args.seed, reps=args.reps,
                    quick=args.quick, front_end=not args.no_front_end).run(progress=not args.disable_tqdm)
    out = prof.save(Path(args.out).expanduser())
    print(summary(prof))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


def summary(prof) -> str:
    """A few representative costs of a profile, one line per stage."""
    from epd.plan.profile import decode_x, encode_x, prefill_x

    lines = [f"profile: {prof.model.get('name')} {prof.dtype} on {prof.device.get('name')} "
             f"({prof.device.get('cores')} cores), threads {prof.threads}, transfer {prof.transfer_backend}"]
    tok448, p448 = prof.image_tokens(448, 448)
    for t in prof.threads:
        lines.append(
            f"  t={t}: encode 448² {1e3 * prof.cost('encode', t, encode_x([(p448, 448 * 448)])):.1f} ms, "
            f"prefill 512 tok {1e3 * prof.cost('prefill', t, prefill_x([512])):.1f} ms, "
            f"decode b1/b16 ctx512 {1e3 * prof.cost('decode', t, decode_x(1, 512)):.2f}/"
            f"{1e3 * prof.cost('decode', t, decode_x(16, 512)):.2f} ms  (fit err "
            + ", ".join(f"{s} {100 * prof.stages[s][t].median_rel_err:.0f}%" for s in prof.stages) + ")")
    lines.append(f"  transfer 1 MB {1e3 * prof.transfer_s(1e6):.2f} ms; host: hop {1e6 * prof.host['hop_s']:.0f} µs, "
                 f"token {1e6 * prof.host['token_s']:.0f} µs, request {1e3 * prof.host['request_s']:.2f} ms")
    for who in ("gateway", "client"):
        if who in prof.host:
            f = prof.front(who)
            lines.append(f"  {who} (measured on epd up): request {1e3 * f['request_s']:.2f} ms + "
                         f"{1e3 * f['request_mbyte_s']:.1f} ms/MB, delivery {1e6 * f['delivery_s']:.0f} µs + "
                         f"token {1e6 * f['token_s']:.0f} µs")
    if "service" in prof.host:
        d = prof.host["service"]
        lines.append(f"  services beyond their forwards (measured on epd up): decode {1e6 * d['decode_step_s']:.0f} µs "
                     f"per step + {1e6 * d['decode_token_s']:.0f} µs per request, prefill "
                     f"{1e3 * d['prefill_request_s']:.2f} ms per request, encode {1e3 * d['encode_image_s']:.2f} ms "
                     "per image")
    if level := prof.device.get("decode_level"):
        lines.append(f"  decode level (epd up probe): served steps ×{level['served_over_fit']:.2f} the samples' fit, "
                     f"decode costs ×{level['applied']:.2f}")
    slow = prof.device.get("slowdown")
    if slow:
        lines.append("  beside another stage: " + ", ".join(
            f"{v} ×{s:.2f} by {a}" for v, row in slow.items() for a, s in row.items()))
        if floor := prof.device.get("slowdown_source", {}).get("decode by encode"):
            lines.append(f"  decode by encode: {floor}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- plan
def add_plan_parser(sub) -> None:
    """``epd plan`` on the ``epd`` subparsers (workload and SLO flags as ``epd bench serve``)."""
    from epd.bench.serve import add_run_args, add_workload_args

    p = sub.add_parser("plan", help="search deployments for the best goodput on a profile (or simulate one "
                                    "with --topology)", description=(
        "Search topology, instances per role, co-location, batch limits, KV layer group and routing for the "
        "highest goodput (rate at ≥ 90 %% SLO attainment) on a profile's simulator; with --topology, simulate "
        "that deployment and print what epd bench serve would."))
    p.add_argument("--profile", required=True, help="profile JSON (epd profile)")
    p.add_argument("--devices", type=int, help="device budget N (search mode)")
    p.add_argument("--topology", help="simulate this deployment instead of searching (epd up notation)")
    p.add_argument("--shapes", default="E-P-D,EP-D,E-PD,EPD,(E-P)-D",
                   help="topology families searched (default: all five)")
    p.add_argument("--trials", type=int, default=60, help="Optuna trials (default 60; per shape with --per-shape)")
    p.add_argument("--per-shape", action="store_true", help="search each shape family on its own (--trials each) "
                   "so that every family's best is found, e.g. to compare the best E-P-D with the best EP-D")
    p.add_argument("--exhaustive", action="store_true", help="evaluate every configuration instead of Optuna")
    p.add_argument("--top", type=int, default=5, help="configurations printed (default 5)")
    p.add_argument("--routing", default="least-loaded", choices=["least-loaded", "round-robin"],
                   help="gateway policy of --topology (the search tries both)")
    p.add_argument("--encoder-max-images", type=int, default=8)
    p.add_argument("--encoder-max-patches", type=int, default=16384)
    p.add_argument("--prefill-max-tokens", type=int, default=4096)
    p.add_argument("--kv-layer-group", type=int, default=2)
    p.add_argument("--decode-max-batch", type=int, default=64)
    p.add_argument("--kv-memory-mb", type=int, default=256, help="decode KV pool (EPD_KV_MEMORY_MB) on CPU profiles")
    p.add_argument("--cores", type=int, help="host cores (CPU profiles; default: the profile's)")
    p.add_argument("--model", dest="plan_model", metavar="DIR",
                   help="the model being planned: refused unless it has the profile's shapes")
    p.add_argument("--device", dest="plan_device", metavar="NAME",
                   help="the device being planned (cpu, accelerator, or part of its name, e.g. A100): "
                        "refused unless the profile was measured on it")
    p.add_argument("--ep-coupled", action="store_true", help="simulate processes hosting encoder+prefill as the "
                   "papers' EP-D baseline (one engine: a step encodes its requests' images, then prefills them; "
                   "images stay on their prefill instance) instead of epd-serve's logically isolated loops")
    p.add_argument("--sim-seed", type=int, default=0, help="seeds nothing random inside the simulator itself "
                   "(arrivals follow --seed as in epd bench serve); kept for reproducibility records")
    add_workload_args(p)
    add_run_args(p)
    p.set_defaults(func=main_plan)


def main_plan(args: argparse.Namespace) -> int:
    """Entry of ``epd plan``."""
    from epd.bench.workloads import WorkloadError
    from epd.plan.profile import ProfileError

    t0 = time.perf_counter()
    try:
        import optuna  # noqa: F401
        import simpy  # noqa: F401
    except ImportError as exc:
        print(f"epd plan: needs the [plan] extra ({exc.name} is missing): pip install 'epd-serve[plan]'",
              file=sys.stderr)
        return 2
    try:
        code = _plan(args)
    except (PlanInputError, ProfileError, WorkloadError) as exc:
        print(f"epd plan: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a bad value inside the bench helpers (SLO, percentiles)
        print(f"epd plan: {exc}", file=sys.stderr)
        return 2
    print(f"(plan wall time {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return code


def _plan(args: argparse.Namespace) -> int:
    from epd.bench.serve import DEFAULT_SLO, BenchInputError, check_run_args
    from epd.plan import report
    from epd.plan.deployment import Deployment, DeploymentError
    from epd.plan.profile import Profile, check_target
    from epd.plan.search import SearchSpace, search
    from epd.plan.workload import sim_workload

    prof = Profile.load(Path(args.profile).expanduser())
    check_target(prof, args.plan_model, args.plan_device)
    if args.goodput is None and not args.topology:
        args.goodput = list(DEFAULT_SLO)
    try:
        slo, percentiles = check_run_args(args)
    except BenchInputError as exc:
        raise PlanInputError(str(exc)) from None
    if args.cores is not None and args.cores < 1:
        raise PlanInputError(f"--cores must be ≥ 1 (got {args.cores})")
    workload = sim_workload(prof, args)
    if args.topology:
        try:
            dep = Deployment.from_args(args, prof)
        except DeploymentError as exc:
            raise PlanInputError(str(exc)) from None
        result = report.simulate_like_bench(prof, dep, workload, args, slo, percentiles)
        if args.save_result:
            path = Path(args.result_dir) / (args.result_filename or f"sim-{dep.slug}.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report.json_safe(result), indent=2))
            print(f"result: {path}")
        return 0
    if args.devices is None:
        raise PlanInputError("give --devices N (search) or --topology T (simulate one deployment)")
    if args.devices < 1:
        raise PlanInputError(f"--devices must be ≥ 1 (got {args.devices})")
    if args.trials < 1 or args.top < 1:
        raise PlanInputError("--trials and --top must be ≥ 1")
    if not slo:
        raise PlanInputError("the search needs SLOs: --goodput ttft:MS tpot:MS")
    try:
        space = SearchSpace.default(prof, args.devices, args.shapes.split(","), cores=args.cores,
                                    kv_memory_mb=args.kv_memory_mb, ep_coupled=args.ep_coupled)
    except DeploymentError as exc:
        raise PlanInputError(str(exc)) from None
    if args.per_shape:
        from dataclasses import replace

        from epd.plan.search import rank

        found = rank([e for shape in space.shapes
                      for e in search(prof, replace(space, shapes=(shape,)), workload, slo, target=args.goodput_target,
                                      trials=args.trials, exhaustive=args.exhaustive, seed=args.seed,
                                      progress=not args.disable_tqdm)])
    else:
        found = search(prof, space, workload, slo, target=args.goodput_target, trials=args.trials,
                       exhaustive=args.exhaustive, seed=args.seed, progress=not args.disable_tqdm)
    report.print_plan(found, prof, args, slo, top=args.top)
    if args.save_result:
        path = Path(args.result_dir) / (args.result_filename or f"plan-{args.devices}dev.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.json_safe(report.plan_json(found, prof, args, slo)), indent=2))
        print(f"result: {path}")
    return 0 if found and math.isfinite(found[0].goodput) else 0
