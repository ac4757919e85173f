"""The simulator against measurement: the same workloads and deployments, run for real with
``epd up`` + ``epd bench serve`` and simulated with ``epd plan --topology``, side by side.

For each deployment: start it (``epd up --topology T``, the launcher's core split, as ``epd bench
compare`` does), run ``epd bench serve --sweep-rates …`` against it (``--ignore-eos``: every
request runs to its output length, as the simulator assumes), stop it; then simulate the same
sweep from the profile. Prints one table — TTFT p50/p90, TPOT p50 and SLO attainment per rate,
goodput per deployment, measured vs simulated with relative errors — and the median absolute
errors; writes every JSON (measured and simulated) under ``--result-dir``.

With ``--repeats N`` each deployment is measured on N fresh ``epd up`` runs (repeat-major:
every deployment once, then again), and the simulator is compared with their combination —
median latencies, pooled SLO attainment, goodput from the pooled curve — with each repeat's
range beside it: on a 2-vCPU VM one deployment can run 20 % faster than the next for its whole
life.

Measurements need an otherwise idle machine: with ``--wait-quiet FILE`` the script waits for FILE
to exist before each deployment and records whether it still existed when that deployment's
runs ended (``quiet`` in the JSON).

    .venv/bin/epd profile --model ~/.cache/epd-serve/models/tiny-seed0 --out docs/plan/profile-tiny.json
    .venv/bin/python benchmarks/plan_validate.py --model ~/.cache/epd-serve/models/tiny-seed0 \\
        --profile docs/plan/profile-tiny.json --dataset-name sharegpt4o-like --rates 3,6,9,12 \\
        --num-prompts 40 --goodput ttft:2000 tpot:50 --result-dir docs/plan/validate-tiny
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epd.bench.compare import start_ours  # noqa: E402
from epd.plan.cli import add_plan_parser  # noqa: E402

EPD = str(Path(sys.executable).with_name("epd"))


def file_name(topology: str) -> str:
    """A file-name part for a topology: ``(E-P)-D`` → ``E-P-coloc-D`` (distinct from ``E-P-D``)."""
    from epd.topology import file_part

    return file_part(topology)


def wait_quiet(path: str | None, poll_s: float = 30.0) -> None:
    if not path:
        return
    first = True
    while not os.path.exists(path):
        if first:
            print(f"waiting for {path} (an otherwise idle machine) ...", flush=True)
            first = False
        time.sleep(poll_s)


def workload_flags(args: argparse.Namespace, sim: bool = False) -> list[str]:
    flags = ["--dataset-name", args.dataset_name, "--num-prompts", str(args.num_prompts), "--seed", str(args.seed),
             "--sweep-rates", args.rates, "--goodput", *args.goodput]
    if args.num_warmups and not sim:
        flags += ["--num-warmups", str(args.num_warmups)]
    if args.dataset_name == "epd-synthetic":
        flags += ["--epd-images", str(args.epd_images)]
    if args.image_reuse:
        flags += ["--image-reuse", str(args.image_reuse)]
    if args.output_len:
        flags += ["--output-len", str(args.output_len)]
    return flags


def measure(topology: str, args: argparse.Namespace, out_dir: Path, tag: str = "") -> tuple[dict, list[str], bool]:
    """``(result JSON, bench command, quiet the whole time)`` of one deployment's measured sweep
    (on a fresh ``epd up``; ``tag`` ends the file names, e.g. ``.r2`` for a repeat)."""
    wait_quiet(args.wait_quiet)
    name = file_name(topology) + tag
    run = start_ours(topology, Path(args.model), out_dir, 240.0)
    try:
        cmd = [EPD, "bench", "serve", "--base-url", run.url, "--model", str(args.model), *workload_flags(args),
               "--ignore-eos", "--save-result", "--result-dir", str(out_dir), "--result-filename",
               f"measured-{name}.json", "--label", topology, "--disable-tqdm", "--request-timeout", "600"]
        print("$ " + shlex.join(cmd), flush=True)
        with open(out_dir / f"measured-{name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    finally:
        run.stop()
        if tag:  # keep each repeat's epd up log
            Path(run.log).replace(out_dir / f"{name}.log")
    quiet = os.path.exists(args.wait_quiet) if args.wait_quiet else None
    return json.loads((out_dir / f"measured-{name}.json").read_text()), cmd, quiet


LATENCY_KEYS = ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms")


def combine(runs: list[dict], target: float = 0.9) -> dict:
    """One measured sweep from repeats of it, each on a fresh deployment: per rate, the median over
    the repeats of TTFT p50/p90 and TPOT p50, and the pooled SLO attainment (requests that met
    the SLO ÷ requests sent, over every repeat); goodput from the pooled attainment curve
    (:func:`epd.bench.metrics.goodput_from_sweep`). Each repeat's own figures stay in
    ``repeats`` (a deployment's speed varies from one ``epd up`` to the next by as much as the
    simulator's target; the comparison is with what the deployment does typically).

    Raises:
        ValueError: no runs, or runs whose rates differ.
    """
    from epd.bench.metrics import goodput_from_sweep

    if not runs:
        raise ValueError("combine needs at least one run")
    rates = [[e["request_rate"] for e in r["sweep"]] for r in runs]
    if any(x != rates[0] for x in rates):
        raise ValueError(f"repeats swept different rates: {rates}")
    sweep = []
    for i, rate in enumerate(rates[0]):
        entries = [r["sweep"][i] for r in runs]
        row = {"request_rate": rate}
        for key in LATENCY_KEYS:
            vals = [e[key] for e in entries if e.get(key) is not None]
            row[key] = statistics.median(vals) if vals else None
        sent = [e.get("completed", 0) + e.get("failed", 0) for e in entries]
        att = [e.get("slo_attainment") for e in entries]
        if all(a is not None for a in att) and sum(sent):
            row["slo_attainment"] = sum(a * n for a, n in zip(att, sent, strict=True)) / sum(sent)
        row["completed"] = sum(e.get("completed", 0) for e in entries)
        row["failed"] = sum(e.get("failed", 0) for e in entries)
        sweep.append(row)
    pts = [(e["request_rate"], e["slo_attainment"]) for e in sweep if e.get("slo_attainment") is not None]
    goodput, how = goodput_from_sweep(pts, target) if pts else (None, "no attainment")
    return {"sweep": sweep, "goodput": goodput, "goodput_how": how,
            "repeats": [{"goodput": r.get("goodput"), "sweep": [{k: e.get(k) for k in (
                "request_rate", *LATENCY_KEYS, "slo_attainment", "completed")} for e in r["sweep"]]} for r in runs]}


def simulate(topology: str, args: argparse.Namespace, out_dir: Path) -> tuple[dict, list[str]]:
    """``(result JSON, plan command)`` of the same sweep simulated (in process)."""
    name = file_name(topology)
    argv = ["plan", "--profile", str(args.profile), "--topology", topology, *workload_flags(args, sim=True),
            "--save-result", "--result-dir", str(out_dir), "--result-filename", f"simulated-{name}.json",
            "--label", topology]
    parser = argparse.ArgumentParser(prog="epd")
    add_plan_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        code = ns.func(ns)
    if code != 0:
        raise RuntimeError(f"epd plan {' '.join(argv)} exited {code}")
    return json.loads((out_dir / f"simulated-{name}.json").read_text()), [EPD, *argv]


def rel(sim: float | None, meas: float | None) -> float | None:
    if sim is None or meas is None or meas == 0:
        return None
    return (sim - meas) / meas


def rows_of(topology: str, meas: dict | None, sim: dict) -> list[dict]:
    out = []
    msweep = {e["request_rate"]: e for e in (meas or {}).get("sweep", [])}
    for s in sim["sweep"]:
        rate = s["request_rate"]
        m = msweep.get(rate, {})
        row = {"deployment": topology, "rate": rate}
        for key in ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "slo_attainment"):
            row[key] = {"measured": m.get(key), "simulated": s.get(key), "rel_err": rel(s.get(key), m.get(key))}
            each = [e.get(key) for r in (meas or {}).get("repeats", []) for e in r["sweep"]
                    if e["request_rate"] == rate and e.get(key) is not None]
            if each:  # the repeats' range: how much fresh deployments differ
                row[key]["repeats_range"] = [min(each), max(each)]
        row["completed"] = {"measured": m.get("completed"), "simulated": s.get("completed")}
        out.append(row)
    return out


def goodput_band(meas: dict | None, target: float = 0.9) -> tuple[float | None, float | None]:
    """The measured goodput had one request fewer / one more met the SLO at every rate: how far
    the figure moves on one request when the attainment curve falls slowly through ``target``
    (``None`` where the lowest rate then misses it)."""
    from epd.bench.metrics import goodput_from_sweep

    sweep = (meas or {}).get("sweep", [])
    pts = [(e["request_rate"], e["slo_attainment"], max(1, e.get("completed") or 1)) for e in sweep
           if e.get("slo_attainment") is not None]
    if not pts:
        return None, None
    lo = goodput_from_sweep([(r, max(0.0, a - 1 / n)) for r, a, n in pts], target)[0]
    hi = goodput_from_sweep([(r, min(1.0, a + 1 / n)) for r, a, n in pts], target)[0]
    return lo, hi


def attainment_summary(rows: list[dict]) -> dict:
    """``{"median_abs_diff", "within_0_10", "points"}``: |simulated − measured| SLO attainment per point."""
    diffs = [abs(r["slo_attainment"]["simulated"] - r["slo_attainment"]["measured"]) for r in rows
             if r["slo_attainment"]["simulated"] is not None and r["slo_attainment"]["measured"] is not None]
    return {"median_abs_diff": statistics.median(diffs) if diffs else None,
            "within_0_10": sum(d <= 0.10 + 1e-9 for d in diffs), "points": len(diffs)}


def fmt(v, pct=False, nd=0):
    if v is None:
        return "–"
    return f"{100 * v:+.0f}%" if pct else f"{v:.{nd}f}"


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def print_table(rows: list[dict], goodputs: dict) -> None:
    print(f"\n{'deployment':<10} {'rate':>5} | {'TTFT p50 meas':>13} {'sim':>7} {'err':>6} | {'TTFT p90 meas':>13} "
          f"{'sim':>7} {'err':>6} | {'TPOT p50 meas':>13} {'sim':>6} {'err':>6} | {'attain meas':>11} {'sim':>5}")
    for r in rows:
        t50, t90, tp, at = r["median_ttft_ms"], r["p90_ttft_ms"], r["median_tpot_ms"], r["slo_attainment"]
        print(f"{r['deployment']:<10} {r['rate']:>5g} | {fmt(t50['measured']):>13} {fmt(t50['simulated']):>7} "
              f"{fmt(t50['rel_err'], True):>6} | {fmt(t90['measured']):>13} {fmt(t90['simulated']):>7} "
              f"{fmt(t90['rel_err'], True):>6} | {fmt(tp['measured'], nd=1):>13} {fmt(tp['simulated'], nd=1):>6} "
              f"{fmt(tp['rel_err'], True):>6} | {fmt(at['measured'], nd=2):>11} {fmt(at['simulated'], nd=2):>5}")
    print(f"\n{'deployment':<10} {'goodput meas':>12} {'sim':>8} {'err':>6}")
    for dep, g in goodputs.items():
        band = g.get("measured_band") or [None, None]
        print(f"{dep:<10} {fmt(g['measured'], nd=2):>12} {fmt(g['simulated'], nd=2):>8} {fmt(g['rel_err'], True):>6}"
              f"   ({g.get('measured_how') or '–'} / {g.get('simulated_how')}; measured ±1 request per rate: "
              f"{fmt(band[0], nd=2)}–{fmt(band[1], nd=2)}"
              + (f"; each repeat: {', '.join(fmt(x, nd=2) for x in g['measured_repeats'])}" if g.get("measured_repeats")
                 else "") + ")")


def markdown(rows: list[dict], goodputs: dict, summary: dict, title: str) -> str:
    """The validation table in Markdown (for the README)."""
    out = [f"**{title}**", "",
           "| deployment | req/s | TTFT p50 ms meas / sim | TTFT p90 ms meas / sim | TPOT p50 ms meas / sim "
           "| attainment meas / sim |", "|---|---|---|---|---|---|"]
    def meas(cell: dict, nd: int = 0) -> str:  # measured, with the repeats' range when there were repeats
        lo_hi = cell.get("repeats_range")
        return fmt(cell["measured"], nd=nd) + (f" ({fmt(lo_hi[0], nd=nd)}–{fmt(lo_hi[1], nd=nd)})" if lo_hi else "")

    for r in rows:
        t50, t90, tp, at = r["median_ttft_ms"], r["p90_ttft_ms"], r["median_tpot_ms"], r["slo_attainment"]
        out.append(f"| {r['deployment']} | {r['rate']:g} | {meas(t50)} / {fmt(t50['simulated'])} "
                   f"({fmt(t50['rel_err'], True)}) | {meas(t90)} / {fmt(t90['simulated'])} "
                   f"({fmt(t90['rel_err'], True)}) | {meas(tp, 1)} / {fmt(tp['simulated'], nd=1)} "
                   f"({fmt(tp['rel_err'], True)}) | {meas(at, 2)} / {fmt(at['simulated'], nd=2)} |")
    repeated = any(g.get("measured_repeats") for g in goodputs.values())
    out += ["", "| deployment | goodput req/s measured | ±1 request per rate | simulated | error |"
            + (" each repeat |" if repeated else ""), "|---|---|---|---|---|" + ("---|" if repeated else "")]
    for dep, g in goodputs.items():
        nd = 3 if (g["measured"] or 1) < 1 else 2
        band = g.get("measured_band") or [None, None]
        each = ", ".join(fmt(x, nd=nd) for x in g.get("measured_repeats") or [])
        out.append(f"| {dep} | {fmt(g['measured'], nd=nd)} | {fmt(band[0], nd=nd)}–{fmt(band[1], nd=nd)} | "
                   f"{fmt(g['simulated'], nd=nd)} | {fmt(g['rel_err'], True)} |" + (f" {each} |" if repeated else ""))
    out += ["", f"Median absolute error: TTFT p50 {pct(summary['median_abs_err_ttft_p50'])}, TTFT p90 "
                f"{pct(summary['median_abs_err_ttft_p90'])}, TPOT p50 "
                f"{pct(summary['median_abs_err_tpot_p50'])}; every goodput within ±20 %: "
                f"{'yes' if summary['goodput_within_20pct'] else 'no'}."]
    att = summary.get("attainment")
    if att and att["points"]:
        out.append(f"SLO attainment, simulated − measured: median |difference| {att['median_abs_diff']:.2f}, within "
                   f"0.10 at {att['within_0_10']} of {att['points']} points.")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory served by epd up")
    ap.add_argument("--profile", required=True, help="its profile (epd profile --model DIR)")
    ap.add_argument("--deployments", default="E-P-D,EP-D,(E-P)-D")
    ap.add_argument("--dataset-name", default="sharegpt4o-like")
    ap.add_argument("--epd-images", type=int, default=4)
    ap.add_argument("--image-reuse", type=float, default=0.0)
    ap.add_argument("--output-len", type=int)
    ap.add_argument("--rates", required=True, help="comma-separated request rates (below and past saturation)")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--num-warmups", type=int, default=8, help="warm-up requests before each measured rate (not "
                    "measured: the first requests of a fresh deployment pay one-off kernel set-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--goodput", nargs="+", default=["ttft:2000", "tpot:50"])
    ap.add_argument("--result-dir", required=True)
    ap.add_argument("--sim-only", action="store_true", help="reuse measured-*.json already in --result-dir")
    ap.add_argument("--wait-quiet", help="measure only while this file exists (waits for it)")
    ap.add_argument("--repeats", type=int, default=1, help="measure each deployment on this many fresh epd ups "
                    "(repeat-major order) and compare the simulator with their combination (median latencies, "
                    "pooled SLO attainment)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    args.model = Path(args.model).expanduser()
    out = Path(args.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, goodputs, commands, quiet = [], {}, {}, {}
    previous = out / "validation.json"
    if args.sim_only and previous.is_file():  # keep what the measured runs recorded
        before = json.loads(previous.read_text())
        quiet = dict(before.get("quiet", {}))
        commands = {k: v for k, v in before.get("commands", {}).items() if k.startswith("measured")}
    topologies = [t.strip() for t in args.deployments.split(",") if t.strip()]
    measured: dict[str, dict | None] = {}
    if args.sim_only:
        for topology in topologies:
            path = out / f"measured-{file_name(topology)}.json"
            measured[topology] = json.loads(path.read_text()) if path.is_file() else None
    else:
        runs: dict[str, list[dict]] = {t: [] for t in topologies}
        for k in range(1, args.repeats + 1):  # repeat-major: slow drift of the machine spreads over all
            for topology in topologies:
                tag = f".r{k}" if args.repeats > 1 else ""
                t0 = time.perf_counter()
                meas, cmd, q = measure(topology, args, out, tag)
                runs[topology].append(meas)
                commands[f"measured {topology}{tag}"] = shlex.join(cmd)
                quiet[topology + tag] = q
                print(f"measured {topology}{tag} in {time.perf_counter() - t0:.0f} s (quiet: {q})", flush=True)
        for topology in topologies:
            measured[topology] = runs[topology][0] if args.repeats == 1 else combine(runs[topology])
            if args.repeats > 1:
                (out / f"measured-{file_name(topology)}.json").write_text(json.dumps(measured[topology], indent=2))
    for topology in topologies:
        meas = measured[topology]
        sim, cmd = simulate(topology, args, out)
        commands[f"simulated {topology}"] = shlex.join(cmd)
        rows += rows_of(topology, meas, sim)
        gm = (meas or {}).get("goodput")
        goodputs[topology] = {"measured": gm, "simulated": sim.get("goodput"), "rel_err": rel(sim.get("goodput"), gm),
                              "measured_how": (meas or {}).get("goodput_how"), "simulated_how": sim.get("goodput_how"),
                              "measured_band": list(goodput_band(meas)),
                              "measured_repeats": [r.get("goodput") for r in (meas or {}).get("repeats", [])]}
    print_table(rows, goodputs)

    def med(key):
        errs = [abs(r[key]["rel_err"]) for r in rows if r[key]["rel_err"] is not None]
        return statistics.median(errs) if errs else None

    summary = {"median_abs_err_ttft_p50": med("median_ttft_ms"), "median_abs_err_ttft_p90": med("p90_ttft_ms"),
               "median_abs_err_tpot_p50": med("median_tpot_ms"),
               "goodput_within_20pct": all(g["rel_err"] is not None and abs(g["rel_err"]) <= 0.2
                                           for g in goodputs.values()),
               "attainment": attainment_summary(rows)}
    att = summary["attainment"]
    print(f"\nmedian |error|: TTFT p50 {pct(summary['median_abs_err_ttft_p50'])}, TTFT p90 "
          f"{pct(summary['median_abs_err_ttft_p90'])}, TPOT p50 {pct(summary['median_abs_err_tpot_p50'])}; "
          f"goodput within ±20 %: {summary['goodput_within_20pct']}; SLO attainment within 0.10 at "
          f"{att['within_0_10']} of {att['points']} points")
    (out / "validation.json").write_text(json.dumps({
        "model": str(args.model), "profile": str(args.profile), "dataset_name": args.dataset_name,
        "rates": args.rates, "num_prompts": args.num_prompts, "seed": args.seed, "goodput_slo": args.goodput,
        "quiet": quiet, "commands": commands, "rows": rows, "goodput": goodputs, "summary": summary,
    }, indent=2))
    title = (f"{Path(args.model).name}, {args.dataset_name}, {args.num_prompts} requests per rate, SLO "
             f"{' '.join(args.goodput)}, profile {Path(args.profile).name}")
    (out / "validation.md").write_text(markdown(rows, goodputs, summary, title))
    print(f"wrote {out / 'validation.json'} and validation.md")


if __name__ == "__main__":
    main()
