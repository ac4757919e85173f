"""``benchmarks/plan_validate.py``'s summaries: the measured goodput's one-request band and the
per-point SLO attainment agreement."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "plan_validate", Path(__file__).resolve().parents[2] / "benchmarks" / "plan_validate.py")
plan_validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan_validate)


def _sweep(points, n=40):
    return {"sweep": [{"request_rate": r, "slo_attainment": a, "completed": n} for r, a in points]}


def test_goodput_band_moves_one_request_per_rate():
    # the tiny E-P-D sweep's shape: attainment falls slowly through 0.9
    meas = _sweep([(1, 1.0), (2, 0.925), (3, 0.8), (3.5, 0.825), (4, 0.5)])
    lo, hi = plan_validate.goodput_band(meas)
    assert lo == pytest.approx(2.0, abs=1e-3)  # 0.925 − 1/40 = 0.9 at rate 2: the crossing
    assert hi == pytest.approx(2.0 + (0.95 - 0.9) / (0.95 - 0.825), abs=1e-3)
    assert lo < 2.2 < hi
    assert plan_validate.goodput_band(None) == (None, None)


def test_attainment_summary_counts_points_within_a_tenth():
    rows = [{"slo_attainment": {"measured": m, "simulated": s}} for m, s in
            ((1.0, 0.97), (0.8, 0.9), (0.5, 0.82), (None, 0.5))]
    got = plan_validate.attainment_summary(rows)
    assert got["points"] == 3 and got["within_0_10"] == 2
    assert got["median_abs_diff"] == pytest.approx(0.10)
