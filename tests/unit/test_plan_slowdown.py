"""The duty-cycled pair probe (epd.plan.slowdown) and the deployment probe's encoder forwards
(epd.plan.frontend): schedules, classification, factors under a drifting host, log parsing."""

from __future__ import annotations

import logging
import time

import pytest

from epd.plan.frontend import encode_beside_decode
from epd.plan.parallel import _windows
from epd.plan.servicelog import decode_steps, encoder_forwards, median_by_window
from epd.plan.slowdown import STAGES, classify, pairs, period_s, schedule, slowdown_table
from services.decode.core import FINISHED_MSG
from services.encoder.engine import ENCODED_MSG


def test_schedule_alternates_a_alone_both_b_alone():
    first, second = schedule(100.0, 0.5, 3)
    assert first == [(100.0, 101.0), (101.5, 102.5), (103.0, 104.0)]
    assert second == [(100.5, 101.5), (102.0, 103.0), (103.5, 104.5)]
    with pytest.raises(ValueError):
        schedule(0.0, 0.0, 3)
    with pytest.raises(ValueError):
        schedule(0.0, 0.5, 0)


def test_period_is_a_few_units_of_the_slower_stage():
    unit = {"encode": 0.15, "prefill": 0.012, "decode": 0.006}
    assert period_s(unit, "encode", "decode") == pytest.approx(0.6)
    assert period_s(unit, "prefill", "decode") == pytest.approx(0.25)  # the floor
    assert pairs() == [("encode", "prefill"), ("encode", "decode"), ("prefill", "decode")]


def _timeline(spans, unit_s, partner_busy, factor, drift):
    """A worker's units over its on-windows: each lasts ``unit_s`` × the host's drift at its
    start, ÷ ``factor`` when the partner is busy then."""
    units = []
    for start, end in spans:
        t = start
        while t < end:
            d = unit_s * drift(t) / (factor if partner_busy(t) else 1.0)
            units.append((t, t + d))
            t += d
    return units


def test_factors_are_recovered_under_a_drifting_host():
    first, second = schedule(0.0, 0.52, 6)

    def on(spans):
        return lambda t: any(s <= t < e for s, e in spans)

    def drift(t):  # the host slows by half over the phase: rounds compared across it would be off
        return 1.0 + 0.5 * t / 9.4

    # a: an encode of 130 ms that loses 10 % beside b; b: a 6 ms decode step that loses 20 %
    units_a = _timeline(first, 0.130, on(second), 0.9, drift)
    units_b = _timeline(second, 0.006, on(first), 0.8, drift)
    got = slowdown_table({("encode", "decode"): (units_a, units_b)})
    assert set(got["slowdown"]) == set(STAGES)
    assert got["slowdown"]["encode"]["decode"] == pytest.approx(0.9, abs=0.05)
    assert got["slowdown"]["decode"]["encode"] == pytest.approx(0.8, abs=0.03)
    raw = got["slowdown_units"]["encode+decode"]
    assert raw["encode"]["n_alone"] >= 6 and raw["encode"]["n_together"] >= 6


def test_classify_drops_units_across_a_switch_and_caps_at_one():
    partner = [(1.0, 1.1), (1.1, 1.2), (1.2, 1.3)]
    victim = [(0.0, 0.5), (0.9, 1.05), (1.05, 1.25), (2.0, 2.1)]
    alone, together = classify(victim, partner)
    assert alone == pytest.approx([0.5, 0.1]) and together == pytest.approx([0.2])
    # faster beside the partner than alone (noise): the factor is capped, the raw ratio kept
    got = slowdown_table({("prefill", "decode"): ([(0.0, 1.0), (1.0, 1.5)], [(1.0, 1.6)])})
    assert got["slowdown"]["prefill"]["decode"] == 1.0
    assert got["slowdown_units"]["prefill+decode"]["prefill"]["ratio"] == pytest.approx(2.0)
    assert got["slowdown"]["decode"]["prefill"] == 1.0  # no unit of decode alone: no figure, 1


def test_worker_windows_run_units_only_inside_their_windows():
    now = time.time()
    spans = [[now + 0.05, now + 0.15], [now + 0.30, now + 0.40]]
    done = _windows(lambda: time.sleep(0.02), spans)
    assert len(done) >= 6
    for start, end in done:
        assert end - start >= 0.02
        assert any(s <= start < e for s, e in spans)  # each started inside a window


def _line(t: float, role: str, msg: str, *args) -> str:
    """One line as ``epd up`` writes it: the supervisor's prefix, then the service's record in
    :func:`epd.bootstrap`'s format."""
    rec = logging.LogRecord(f"services.{role}.engine", logging.INFO, __file__, 1, msg, args, None)
    rec.created, rec.msecs = t, (t % 1) * 1000
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s")
    return f"10:00:00 {role}-0  | " + fmt.format(rec)


def test_encoder_forwards_are_read_from_the_log_by_window(tmp_path):
    base = float(int(time.time()))
    lines = [_line(base + 1.2, "encoder", ENCODED_MSG, 1, 140.0), _line(base + 1.5, "encoder", ENCODED_MSG, 2, 300.0),
             _line(base + 1.6, "prefill", "prefill batch of 1"), _line(base + 1.8, "encoder", ENCODED_MSG, 1, 144.0),
             _line(base + 5.3, "encoder", ENCODED_MSG, 1, 160.0), "garbage line"]
    log = tmp_path / "up.log"
    log.write_text("\n".join(lines) + "\n")
    got = encoder_forwards(log, [(base + 1.0, base + 2.0), (base + 5.0, base + 6.0), (base + 9, base + 10)])
    assert got == [[140.0, 150.0, 144.0], [160.0], []]  # a two-image batch: its time per image
    assert median_by_window(got) == (147.0, [144.0, 160.0, None])
    assert median_by_window(got, least=5) == (None, [144.0, 160.0, None])


def test_decode_steps_are_read_from_the_log_by_window(tmp_path):
    base = float(int(time.time()))
    lines = [_line(base + 1.1, "decode", FINISHED_MSG, "chatcmpl-1", 96, 95, 4.25),
             _line(base + 1.2, "encoder", ENCODED_MSG, 1, 140.0),
             _line(base + 1.3, "decode", FINISHED_MSG, "chatcmpl-2", 96, 95, 4.75),
             _line(base + 3.5, "decode", FINISHED_MSG, "chatcmpl-3", 128, 127, 6.5)]
    log = tmp_path / "up.log"
    log.write_text("\n".join(lines) + "\n")
    assert decode_steps(log, [(base + 1.0, base + 2.0), (base + 3.0, base + 4.0)]) == [[4.25, 4.75], [6.5]]


def test_encode_beside_decode_is_the_ratio_of_the_medians_or_none():
    runs = {"image_one": {"encode_forward_ms": 143.7}, "beside": {"encode_forward_ms": 156.1}}
    assert encode_beside_decode(runs) == pytest.approx(143.7 / 156.1)
    runs["beside"]["encode_forward_ms"] = 120.0
    assert encode_beside_decode(runs) == 1.0
    assert encode_beside_decode({"image_one": {}, "beside": {}}) is None
