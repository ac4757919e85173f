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


def _run(points, goodput, n=40):
    """One repeat's sweep: ``points`` = [(rate, ttft p50, tpot p50, attainment)]."""
    return {"goodput": goodput, "sweep": [
        {"request_rate": r, "median_ttft_ms": t, "p90_ttft_ms": 2 * t, "median_tpot_ms": p, "slo_attainment": a,
         "completed": n, "failed": 0} for r, t, p, a in points]}


def test_combine_takes_median_latencies_and_pooled_attainment():
    runs = [_run([(1, 200, 7.0, 1.0), (2, 220, 7.5, 0.925), (3, 250, 8.0, 0.8)], 2.2),
            _run([(1, 190, 6.0, 0.95), (2, 210, 6.5, 0.95), (3, 240, 7.0, 0.9)], 3.0),
            _run([(1, 230, 8.0, 1.0), (2, 260, 8.5, 0.9), (3, 300, 9.0, 0.85)], 2.0)]
    got = plan_validate.combine(runs)
    rate2 = got["sweep"][1]
    assert rate2["median_ttft_ms"] == 220 and rate2["p90_ttft_ms"] == 440 and rate2["median_tpot_ms"] == 7.5
    assert rate2["slo_attainment"] == pytest.approx((0.925 + 0.95 + 0.9) / 3)
    assert rate2["completed"] == 120
    # pooled attainment at 3 req/s is 0.85: the crossing lies between 2 and 3
    a2, a3 = rate2["slo_attainment"], got["sweep"][2]["slo_attainment"]
    assert got["goodput"] == pytest.approx(2 + (a2 - 0.9) / (a2 - a3)) and got["goodput_how"] == "interpolated"
    assert [r["goodput"] for r in got["repeats"]] == [2.2, 3.0, 2.0]
    # the per-rate rows carry the repeats' range
    sim = {"sweep": [{"request_rate": r, "median_ttft_ms": 200.0} for r in (1, 2, 3)]}
    row = plan_validate.rows_of("E-P-D", got, sim)[1]
    assert row["median_ttft_ms"]["repeats_range"] == [210, 260]
    assert row["median_ttft_ms"]["rel_err"] == pytest.approx((200 - 220) / 220)


def test_combine_weights_attainment_by_requests_and_rejects_mismatched_rates():
    a = _run([(1, 200, 7.0, 1.0)], 1.0, n=30)
    b = _run([(1, 200, 7.0, 0.5)], None, n=10)
    assert plan_validate.combine([a, b])["sweep"][0]["slo_attainment"] == pytest.approx((30 + 5) / 40)
    with pytest.raises(ValueError, match="different rates"):
        plan_validate.combine([a, _run([(2, 200, 7.0, 1.0)], 2.0)])
    with pytest.raises(ValueError):
        plan_validate.combine([])
