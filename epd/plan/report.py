"""What ``epd plan`` prints and saves: simulated runs in ``epd bench serve``'s table and JSON
layout, and the ranked plan with a ready-to-run environment per configuration."""

from __future__ import annotations

import argparse
import math
import shlex
from datetime import datetime

from epd.bench.metrics import compute_metrics, goodput_from_sweep
from epd.bench.serve import print_table, slo_text
from epd.plan.deployment import Deployment
from epd.plan.profile import Profile
from epd.plan.search import SHAPE_PARTS, Evaluated, best_of_shape
from epd.plan.sim import simulate
from epd.plan.workload import SimWorkload


def json_safe(obj):
    """``inf`` → ``"inf"`` (JSON has no infinity), recursively (as ``epd bench serve`` writes it)."""
    if isinstance(obj, float) and math.isinf(obj):
        return "inf"
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def sim_figures(prof: Profile, dep: Deployment, workload: SimWorkload, rate: float, slo: dict[str, float],
                percentiles: list[float] | tuple[float, ...] = (90.0, 99.0)) -> tuple[dict, dict]:
    """``(figures as compute_metrics returns them + the bench's run fields, simulator stats)``."""
    res = simulate(prof, dep, workload, rate)
    out = compute_metrics(res.records, res.duration_s, slo, tuple(percentiles))
    out |= {"interrupted": False, "unfinished": 0, "median_dispatch_lag_ms": 0.0, "p99_dispatch_lag_ms": 0.0}
    return out, res.stats


def head(prof: Profile, dep: Deployment, workload: SimWorkload, args: argparse.Namespace | None, label: str) -> dict:
    """The settings part of a result JSON, with ``epd bench serve``'s keys (``backend: epd-sim``)."""
    wa = workload.args
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "epd-sim", "label": label,
        "model_id": prof.model.get("name", ""), "tokenizer_id": wa.tokenizer if wa else None,
        "dataset_name": workload.dataset_name, "num_prompts": len(workload.requests),
        "burstiness": workload.burstiness, "max_concurrency": workload.max_concurrency, "seed": workload.seed,
        "image_reuse": wa.image_reuse if wa else 0.0, "ignore_eos": True,
        "metadata": {"profile": prof.path, "topology": dep.topology, "routing": dep.routing,
                     "limits": dep.limits.__dict__, "cores": dep.cores or prof.device.get("cores"),
                     "device": prof.device.get("name"), "dtype": prof.dtype},
    }


def simulate_like_bench(prof: Profile, dep: Deployment, workload: SimWorkload, args: argparse.Namespace,
                        slo: dict[str, float], percentiles: list[float]) -> dict:
    """Simulate ``dep`` at ``--request-rate`` or each ``--sweep-rates`` rate; print the bench's table
    per rate and the goodput of a sweep; return the result JSON (the bench's schema)."""
    label = args.label or f"sim {dep.topology}"
    top = head(prof, dep, workload, args, label)
    rates = args.sweep_rates or [args.request_rate]
    sweep, points = [], []
    for rate in rates:
        fig, stats = sim_figures(prof, dep, workload, rate, slo, percentiles)
        print_table(fig, f"{label} @ {rate:g} req/s (simulated)")
        sweep.append(top | {"request_rate": rate} | fig | {"sim_stats": stats})
        points.append((rate, fig.get("slo_attainment", 0.0)))
    if not args.sweep_rates:
        return sweep[0]
    g, how = goodput_from_sweep(points, args.goodput_target)
    print(f"goodput ({args.goodput_target:.0%} attainment of {slo_text(slo)}): "
          + (f"{g:.3f} req/s ({how})" if g is not None else "below the lowest rate simulated"))
    return top | {"request_rate": None, "sweep": sweep, "goodput_target": args.goodput_target,
                  "goodput_slo_ms": slo, "goodput": g, "goodput_how": how}


def env_line(dep: Deployment) -> str:
    """``EPD_TOPOLOGY='2E-1P-1D' EPD_… epd up`` for a deployment."""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in dep.env().items()) + " epd up"


def print_plan(found: list[Evaluated], prof: Profile, args: argparse.Namespace, slo: dict[str, float],
               top: int = 5) -> None:
    """The best ``top`` configurations (best first) and the best of each shape family."""
    n = len(found)
    print(f"plan: {args.devices} device(s) of {prof.device.get('name')} ({prof.device.get('kind')}), model "
          f"{prof.model.get('name')} {prof.dtype}; workload {args.dataset_name} × {args.num_prompts}; "
          f"goodput = highest rate with ≥ {args.goodput_target:.0%} meeting {slo_text(slo)}; {n} configuration(s) "
          f"simulated")
    if prof.scale:
        print(f"profile scaled: {prof.scale.get('source')}")
    print(f"{'#':>2}  {'goodput req/s':>13}  {'topology':<14} {'enc imgs':>8} {'pre tok':>7} {'KV G':>4} "
          f"{'dec batch':>9}  routing")
    for i, e in enumerate(found[:top], 1):
        c = e.config
        g = f"{e.goodput:.2f}" + ("+" if e.how == "lower-bound" else "")
        print(f"{i:>2}  {g:>13}  {c.topology:<14} {c.encoder_max_images:>8} {c.prefill_max_tokens:>7} "
              f"{c.kv_layer_group:>4} {c.decode_max_batch:>9}  {c.routing}")
    if found:
        best = found[0]
        print("\nrun the best:")
        print(f"  {env_line(best.deployment)}")
        comp = best.deployment.compose_env()
        if comp is not None:
            print("  compose/.env: " + " ".join(f"{k}={v}" for k, v in comp.items()))
        else:
            print("  (compose runs one role per container; this topology co-locates roles: use epd up or the "
                  "Kubernetes overlays)")
        if best.config.routing != "least-loaded":
            print("  note: round-robin routing is simulated only; the gateway implements least-loaded")
    shapes = [s for s in SHAPE_PARTS if best_of_shape(found, s) is not None]
    if len(shapes) > 1:
        print("\nbest per shape: " + ", ".join(
            f"{s} {best_of_shape(found, s).goodput:.2f} ({best_of_shape(found, s).config.topology})" for s in shapes))
        epd, ep = best_of_shape(found, "E-P-D"), best_of_shape(found, "EP-D")
        if epd is not None and ep is not None and ep.goodput > 0:
            print(f"best E-P-D ÷ best EP-D goodput: {epd.goodput / ep.goodput:.2f}×"
                  + (" (EP-D simulated as the papers' coupled engine)" if getattr(args, "ep_coupled", False) else ""))


def plan_json(found: list[Evaluated], prof: Profile, args: argparse.Namespace, slo: dict[str, float]) -> dict:
    """The plan as JSON: every evaluated configuration, best first, with its env and points."""
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "profile": prof.path, "scale": prof.scale,
        "devices": args.devices, "dataset_name": args.dataset_name, "num_prompts": args.num_prompts,
        "seed": args.seed, "goodput_slo_ms": slo, "goodput_target": args.goodput_target,
        "configurations": [
            {"rank": i, "goodput": e.goodput, "goodput_how": e.how, "topology": e.config.topology,
             "shape": e.config.shape, "counts": list(e.config.counts), "routing": e.config.routing,
             "limits": e.deployment.limits.__dict__, "env": e.deployment.env(),
             "compose_env": e.deployment.compose_env(), "points": e.points}
            for i, e in enumerate(found, 1)
        ],
    }
