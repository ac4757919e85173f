"""The machine's common-mode speed drift over a profile, and stage samples normalised to it.

A small VM's speed wanders: on the 2 vCPU AVX-512 VM of ``README.md`` ("The profile's own
draw"), a one-request decode step of the tiny model measured 3.0–3.5 ms for a minute and
4.2–5.1 ms the minute before, in the same process; its 10-second medians ranged over
0.81–1.71 × the 5-minute median, its 100-second medians over 0.90–1.20 ×. One slow burst
lasts seconds and hits every stage at once (the encoder's forward slowed by the same
bursts, by less). A profile that times each stage's samples in one block of a few seconds
therefore fits that block's speed, not the machine's.

:class:`DriftReference` times a small fixed unit of each stage kind (a reference draw)
between the profile's measurements and at its phase boundaries. Each sample measured in the
window ``[t0, t1]`` is then scaled by ``level / local``: ``level`` is the median of all of
that kind's draws over the profile, ``local`` the mean of the draw just before ``t0`` and
the one just after ``t1``. The fitted curve keeps its shape from the samples and takes its
level from the whole profile's span, the way the duty-cycled pair probe
(:mod:`epd.plan.slowdown`) cancels drift in its ratios.
"""

from __future__ import annotations

import bisect
import statistics
import time
from collections.abc import Callable

MIN_DRAWS = 3  # fewer than this: samples are left as measured
NEIGHBOURS = 2  # draws on each side of a sample that give its local reference


class DriftReference:
    """Reference draws of each stage kind, and the factor a sample is normalised by.

    Args:
        units: reference kind (``encode``, ``decode``) → a callable that runs one
            reference unit of that kind (a few to a few tens of ms; the same work every call).
        clock: seconds, monotonic (``time.perf_counter``; injectable for tests).
    """

    def __init__(self, units: dict[str, Callable[[], object]],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.units = units
        self.clock = clock
        self.draws: dict[str, list[tuple[float, float]]] = {k: [] for k in units}

    def draw(self, n: int = 1) -> None:
        """Time ``n`` units of every kind now; each draw is ``(midpoint, seconds)``."""
        for _ in range(n):
            for kind, fn in self.units.items():
                t0 = self.clock()
                fn()
                t1 = self.clock()
                self.draws[kind].append(((t0 + t1) / 2, t1 - t0))

    def add(self, kind: str, at: float, seconds: float) -> None:
        """Record a draw measured elsewhere (tests, or a unit timed by the caller)."""
        self.draws.setdefault(kind, []).append((at, seconds))

    def level(self, kind: str) -> float | None:
        """Median seconds of ``kind``'s draws over the whole profile; ``None`` below :data:`MIN_DRAWS`."""
        got = self.draws.get(kind, [])
        if len(got) < MIN_DRAWS:
            return None
        return statistics.median(s for _, s in got)

    def local(self, kind: str, t0: float, t1: float) -> float | None:
        """Seconds of ``kind``'s reference around the window ``[t0, t1]``: the median of the
        :data:`NEIGHBOURS` last draws at or before ``t0`` and as many first draws at or after
        ``t1`` (fewer at the ends). One draw is a few ms of work and jitters by itself; a slow
        burst lasts seconds and spans several draws."""
        got = sorted(self.draws.get(kind, []))
        if not got:
            return None
        times = [t for t, _ in got]
        before = bisect.bisect_right(times, t0)
        after = bisect.bisect_left(times, t1)
        near = [s for _, s in got[max(0, before - NEIGHBOURS):before] + got[after:after + NEIGHBOURS]]
        return statistics.median(near)

    def factor(self, kind: str, t0: float, t1: float) -> float:
        """``level / local`` for a sample of ``kind`` measured in ``[t0, t1]``; 1.0 when too few draws."""
        level, local = self.level(kind), self.local(kind, t0, t1)
        if level is None or not local:
            return 1.0
        return level / local

    def normalise(self, kind: str, samples: list[dict]) -> None:
        """Scale each sample's ``s`` in place by :meth:`factor` over its ``window`` (a
        ``[t0, t1]`` pair, kept); the measured value is kept as ``s_raw``. Samples without a
        window, or already normalised, are left alone."""
        for s in samples:
            window = s.get("window")
            if window is None or "s_raw" in s:
                continue
            f = self.factor(kind, *window)
            s["s_raw"] = s["s"]
            s["s"] = s["s"] * f
            s["drift"] = round(f, 4)

    def summary(self) -> dict:
        """For the profile JSON: per kind, the number of draws, their span (s) and level (s),
        the range of draw ÷ level, and the draws themselves (``[time s, seconds]``)."""
        out = {}
        for kind, got in self.draws.items():
            level = self.level(kind)
            if level is None:
                continue
            times = [t for t, _ in got]
            out[kind] = {"draws": len(got), "span_s": round(max(times) - min(times), 2), "level_s": level,
                         "ratio_range": [round(min(s for _, s in got) / level, 3),
                                         round(max(s for _, s in got) / level, 3)],
                         "series": [[round(t, 3), round(s, 6)] for t, s in got]}
        return out


def reference_units(adapter, runner, image, gen, dtype: str) -> dict[str, Callable[[], object]]:
    """One small fixed unit per stage kind, for :class:`DriftReference` (run on one thread).

    Args:
        adapter: the model's :class:`~epd.models.qwen2_vl.Qwen2VLAdapter`.
        runner: its :class:`~epd.models.qwen2_runner.Qwen2VLRunner`.
        image: a PIL image (224² in ``epd profile``).
        gen: a seeded ``torch.Generator`` for the KV contents.
        dtype: the KV pool's dtype name.

    Returns:
        ``encode``: the image through the vision tower (:meth:`Qwen2VLAdapter.encode`), compute-bound
        like a prefill; ``decode``: eight one-request decode forwards at context 64 over a small
        paged KV pool (the same slot each time, so every call is equal), bound by per-op overhead
        like a decode step. (A 64-token prefill as the prefill's own reference was tried: over
        four profiles it left the prefill samples more spread than the encode's reference did.)
    """
    import torch

    from epd.engine.kv_pool import KvLayout, KvPool

    pool = KvPool(KvLayout(adapter.num_layers, 8, 16, adapter.num_kv_heads, adapter.head_dim, dtype))
    pool.kv.normal_(generator=gen)
    table, past = torch.tensor([[0, 1, 2, 3, 4]]), torch.tensor([64])

    def decode():
        for _ in range(8):
            runner.decode(torch.tensor([11]), past, pool.kv, table, past)

    return {"encode": lambda: adapter.encode([image]), "decode": decode}
