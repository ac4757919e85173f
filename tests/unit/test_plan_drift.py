"""The drift reference (epd.plan.drift): samples taken in a slow burst are brought back to the
profile's level, the neighbours around a window are the ones used, and too few draws change
nothing."""

import pytest

from epd.plan.drift import MIN_DRAWS, NEIGHBOURS, DriftReference


def _ref(draws):
    ref = DriftReference({})
    for t, s in draws:
        ref.add("decode", t, s)
    return ref


def test_sample_in_a_slow_burst_is_scaled_to_the_level():
    # the machine runs at 4 ms per reference unit, except for a burst at 1.5x over t=9..13
    draws = ([(t, 0.004) for t in range(0, 9)] + [(t, 0.006) for t in (9, 10, 12, 13)]
             + [(t, 0.004) for t in range(14, 24)])
    ref = _ref(draws)
    assert ref.level("decode") == pytest.approx(0.004)
    samples = [{"s": 0.009, "window": (10.2, 11.8), "what": "slow"},
               {"s": 0.006, "window": (3.2, 3.8), "what": "fast"}]
    ref.normalise("decode", samples)
    slow, fast = samples
    assert slow["s"] == pytest.approx(0.006) and slow["s_raw"] == 0.009
    assert slow["drift"] == pytest.approx(2 / 3, abs=1e-4)
    assert fast["s"] == pytest.approx(0.006) and fast["drift"] == 1.0
    assert slow["window"] == (10.2, 11.8)  # kept for the record
    ref.normalise("decode", samples)  # already normalised: left alone
    assert slow["s"] == pytest.approx(0.006)


def test_local_is_the_median_of_the_neighbours_on_each_side():
    assert NEIGHBOURS == 2
    ref = _ref([(0.0, 1.0), (1.0, 2.0), (2.0, 9.0), (3.0, 4.0), (4.0, 5.0), (5.0, 8.0)])
    # before 2.5: draws at 1.0 and 2.0 (2, 9); after 2.8: 3.0 and 4.0 (4, 5) -> median of 2, 9, 4, 5
    assert ref.local("decode", 2.5, 2.8) == pytest.approx(4.5)
    assert ref.local("decode", 1.0, 1.0) == pytest.approx(2.0)  # a draw exactly at the window counts on both sides
    assert ref.local("decode", -2.0, -1.0) == pytest.approx(1.5)  # before every draw: the first two
    assert ref.local("decode", 6.0, 7.0) == pytest.approx(6.5)  # after every draw: the last two
    assert ref.local("encode", 0.0, 1.0) is None


def test_too_few_draws_leave_samples_as_measured():
    ref = _ref([(float(t), 0.004) for t in range(MIN_DRAWS - 1)])
    samples = [{"s": 0.01, "window": (0.5, 0.6)}]
    ref.normalise("decode", samples)
    assert samples[0]["s"] == 0.01 and samples[0]["drift"] == 1.0
    assert ref.summary() == {}


def test_samples_without_a_window_are_left_alone():
    ref = _ref([(float(t), 0.004 * (1 + t % 2)) for t in range(6)])
    samples = [{"s": 0.01}]
    ref.normalise("decode", samples)
    assert samples == [{"s": 0.01}]


def test_draw_times_every_kind_with_its_clock_and_summary_reports_span_and_range():
    now = [0.0]
    calls = []

    def clock():
        return now[0]

    def unit(kind, secs):
        def run():
            calls.append(kind)
            now[0] += secs
        return run

    ref = DriftReference({"encode": unit("encode", 0.02), "decode": unit("decode", 0.005)}, clock=clock)
    ref.draw(3)
    assert calls == ["encode", "decode"] * 3
    assert [s for _, s in ref.draws["encode"]] == pytest.approx([0.02] * 3)
    assert ref.draws["decode"][0][0] == pytest.approx(0.0225)  # the unit's midpoint
    summary = ref.summary()
    assert summary["decode"]["draws"] == 3 and summary["decode"]["span_s"] == pytest.approx(0.05)
    assert summary["encode"]["ratio_range"] == [1.0, 1.0]
