"""What one stage loses while another runs beside it in a second process: the pair probe.

Two processes on two cores still share caches and memory bandwidth (and on a VM perhaps one
physical core), so a stage's unit of work takes longer while another stage runs beside it. The
simulator applies the measured factor per pair of running stages
(:class:`epd.plan.shared.SharedDevice`).

The effect is a few per cent to a fifth, and this host's own speed wanders by more: here the rate
of a 1.2 s round of the same decode step ranged 134–202 steps/s, of an encode 6.6–8.0/s, so the
ratio of one round beside to one alone was noise (one profile measured encode beside decode at
×0.91, the next at ×1.09). The probe therefore never compares rounds; it compares **units of
work timed side by side, a fraction of a second apart**:

- for each pair of stages (a, b), worker 0 works a and worker 1 works b on a duty cycle of
  period 3T (:func:`schedule`): a alone for T, both for T, b alone for T, again and again, so the
  alone and together states alternate faster than the host drifts;
- each worker times every unit it runs (``[start, end]``, wall clock, comparable across the two
  processes);
- a unit of a is *together* when b's units cover it from start to end, *alone* when no unit of
  b overlaps it (:func:`classify`; a unit across a switch counts as neither);
- in each of a's on-windows, the median duration of its alone units ÷ that of its together
  units (:func:`window_ratios`; medians, not means: a unit preempted by the host is an outlier);
  a's factor beside b is the median of those ratios over the phase (:func:`slowdown_table`).

T is a few units of the slower stage of the pair (:func:`period_s`), so each state holds whole
units of both.
"""

from __future__ import annotations

import math
import statistics

STAGES = ("encode", "prefill", "decode")
UNITS_PER_STATE = 4  # T = this many units of the pair's slower stage
MIN_STATE_S = 0.25
GAP_S = 0.005  # units of one worker closer than this are one busy stretch


def pairs() -> list[tuple[str, str]]:
    """Every pair of different stages, in :data:`STAGES` order: (encode, prefill), (encode,
    decode), (prefill, decode)."""
    return [(a, b) for i, a in enumerate(STAGES) for b in STAGES[i + 1:]]


def period_s(unit_s: dict[str, float], a: str, b: str) -> float:
    """T, seconds each state of the pair (a, b)'s duty cycle lasts: :data:`UNITS_PER_STATE` units
    of the slower of the two (``unit_s``: seconds per unit of each stage), at least
    :data:`MIN_STATE_S`."""
    return max(MIN_STATE_S, UNITS_PER_STATE * max(unit_s[a], unit_s[b]))


def schedule(t0: float, state_s: float, cycles: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """The two workers' on-windows ``[(start, end)]`` (wall-clock seconds) for ``cycles`` duty cycles
    from ``t0``: worker 0 works [c, c + 2T], worker 1 works [c + T, c + 3T] for each cycle start
    c = t0 + 3T·i, so the states run a alone, both, b alone, a alone, …

    Raises:
        ValueError: ``state_s`` ≤ 0 or ``cycles`` < 1.
    """
    if state_s <= 0 or cycles < 1:
        raise ValueError(f"schedule: need state_s > 0 and cycles ≥ 1 (got {state_s}, {cycles})")
    first, second = [], []
    for i in range(cycles):
        c = t0 + 3 * state_s * i
        first.append((c, c + 2 * state_s))
        second.append((c + state_s, c + 3 * state_s))
    return first, second


def _stretches(units: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A worker's units merged into busy stretches (gaps under :data:`GAP_S` closed)."""
    out: list[list[float]] = []
    for s, e in sorted(units):
        if out and s - out[-1][1] <= GAP_S:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def classify(victim: list[tuple[float, float]], partner: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """``(alone, together)``: the durations (seconds) of the ``victim``'s units that no unit of
    the ``partner`` overlapped, and of those the partner's busy stretches covered from start to
    end; units across a switch are in neither."""
    busy = _stretches(partner)
    alone, together = [], []
    for s, e in victim:
        hit = [(bs, be) for bs, be in busy if bs < e and be > s]
        if not hit:
            alone.append(e - s)
        elif any(bs <= s and be >= e for bs, be in hit):
            together.append(e - s)
    return alone, together


def window_ratios(mine: list[tuple[float, float]], theirs: list[tuple[float, float]]) -> list[float]:
    """For each on-window of a worker (its units' busy stretches: each holds one alone state and
    one together state of the duty cycle), the median duration of its alone units ÷ that of its
    together units; windows without both are skipped. Each ratio compares units under a second
    apart, so a drift of the host's speed over the phase does not enter it."""
    out = []
    for s, e in _stretches(mine):
        alone, together = classify([u for u in mine if s <= u[0] and u[1] <= e], theirs)
        if alone and together:
            out.append(statistics.median(alone) / statistics.median(together))
    return out


def slowdown_table(phases: dict[tuple[str, str], tuple[list, list]]) -> dict:
    """The factors from the pair phases.

    Args:
        phases: ``{(a, b): (a's units, b's units)}``, each unit ``(start, end)`` in wall-clock
            seconds, from one duty-cycled phase of :func:`schedule`.

    Returns:
        ``{"slowdown": {victim: {co-runner: factor ≤ 1}}, "slowdown_units": {"a+b": {stage:
        {"alone_ms", "together_ms", "ratio", "windows", "n_alone", "n_together"}}}}``: the factor
        is the median over the victim's on-windows of :func:`window_ratios`, capped at 1 (a stage
        does not run faster beside another; the uncapped ``ratio`` is kept); 1 where no window had
        units of both kinds. ``alone_ms`` / ``together_ms`` are the medians over the whole phase.
    """
    table: dict[str, dict[str, float]] = {st: {} for st in STAGES}
    raw: dict[str, dict[str, dict]] = {}
    for (a, b), (units_a, units_b) in phases.items():
        raw[f"{a}+{b}"] = {}
        for victim, other, mine, theirs in ((a, b, units_a, units_b), (b, a, units_b, units_a)):
            alone, together = classify(mine, theirs)
            ratios = window_ratios(mine, theirs)
            ratio = statistics.median(ratios) if ratios else 1.0
            table.setdefault(victim, {})[other] = min(1.0, ratio) if math.isfinite(ratio) else 1.0
            raw[f"{a}+{b}"][victim] = {
                "alone_ms": 1e3 * statistics.median(alone) if alone else None,
                "together_ms": 1e3 * statistics.median(together) if together else None,
                "ratio": ratio, "windows": len(ratios), "n_alone": len(alone), "n_together": len(together)}
    return {"slowdown": table, "slowdown_units": raw}
