"""How much of the simulator's validation error is the measurement's own noise.

Reads several measured sweeps of the same deployments and workload (``measured-*.json`` as
``benchmarks/plan_validate.py`` writes them, one directory per repetition), takes the median of
the repetitions at every (deployment, rate) point as the reference, and prints:

- each repetition's median absolute deviation from that reference (TTFT p50, TTFT p90,
  TPOT p50): the error a perfect predictor would show against a single run;
- with ``--simulated DIR …``: each simulated sweep's (``simulated-*.json``) median absolute error
  against the reference instead of against one run.

    .venv/bin/python benchmarks/plan_repeatability.py --measured docs/plan/repeat-tiny-avx512/run-* \\
        --simulated docs/plan/validate-tiny-avx512-v2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms")


def points(run_dir: Path, kind: str) -> dict[tuple[str, float, str], float]:
    """``{(deployment file part, rate, key): value}`` of every ``{kind}-*.json`` sweep in ``run_dir``."""
    out = {}
    for path in sorted(run_dir.glob(f"{kind}-*.json")):
        name = path.stem.split("-", 1)[1]
        for entry in json.loads(path.read_text()).get("sweep", []):
            for key in KEYS:
                if entry.get(key) is not None:
                    out[(name, float(entry["request_rate"]), key)] = float(entry[key])
    return out


def median_abs_err(values: dict, reference: dict) -> dict[str, float | None]:
    """Per key, the median of ``|value − reference| / reference`` over the points both have."""
    out = {}
    for key in KEYS:
        errs = [abs(v - reference[p]) / reference[p] for p, v in values.items() if p[2] == key and p in reference
                and reference[p] > 0]
        out[key] = statistics.median(errs) if errs else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measured", nargs="+", required=True, help="directories, one measured sweep each")
    ap.add_argument("--simulated", nargs="*", default=[], help="directories with simulated-*.json sweeps")
    args = ap.parse_args()
    runs = {d: points(Path(d), "measured") for d in args.measured}
    keys = set.intersection(*(set(r) for r in runs.values()))
    if not keys:
        raise SystemExit("no (deployment, rate) point is in every measured directory")
    reference = {p: statistics.median(r[p] for r in runs.values()) for p in keys}
    spread = [max(r[p] for r in runs.values()) / min(r[p] for r in runs.values()) - 1 for p in keys]
    print(f"{len(runs)} measured repetitions, {len(keys) // len(KEYS)} points; reference: their median per point; "
          f"largest max/min − 1 at a point: {100 * max(spread):.0f} %")
    print(f"{'sweep':<48} {'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9}")

    def row(label: str, errs: dict) -> None:
        print(f"{label:<48} " + " ".join("        –" if errs[k] is None else f"{100 * errs[k]:8.1f}%" for k in KEYS))

    for d, r in runs.items():
        row(f"measured {d}", median_abs_err({p: r[p] for p in keys}, reference))
    for d in args.simulated:
        row(f"simulated {d}", median_abs_err(points(Path(d), "simulated"), reference))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
