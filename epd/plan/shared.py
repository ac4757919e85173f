"""A device whose time is shared by whatever runs on it: processor sharing in SimPy.

Each job brings *work* (seconds it would take alone on the device with its thread count —
what the profile measured) and a *demand* (threads it keeps busy: a process's
``EPD_TORCH_THREADS`` on cpu; 1 on an accelerator, where a job occupies the whole device).
While the running jobs' demands add up to at most the capacity (cores on cpu, 1 for an
accelerator) every job runs at full speed; beyond it every job slows down by the same factor
``capacity / Σ demand`` (the OS time-slices threads fairly; on an accelerator two co-located
roles interleave kernels). On cpu the capacity is a measured curve of the busy thread count
(:func:`epd.plan.parallel.measure`): oversubscribed cores do less than their number. That is
how co-location (two roles sharing a device's time, EPD-Serve §3.5) and this machine's 2 cores
shared by every process enter the simulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import simpy

EPS = 1e-9  # seconds of work left that count as done (float residue of now + dt)


@dataclass
class _Job:
    remaining: float
    demand: float
    done: simpy.Event
    owner: str = ""
    group: str = ""  # the process the job's role runs in
    group_cap: float = 0.0  # threads that process has in all (0: no per-process limit)
    stage: str = ""  # what the job is ("encode", "prefill", "decode", ...): picks its slowdown row


class SharedDevice:
    """Processor sharing over ``capacity`` units (see the module docstring).

    Attributes:
        busy_s: time with at least one job running; work_s: work completed (seconds alone).
    """

    def __init__(self, env: simpy.Environment, capacity: float, name: str = "", interference: float = 1.0,
                 group_efficiency: float = 1.0, capacity_curve: dict[int, float] | None = None,
                 slowdown: dict[str, dict[str, float]] | None = None) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if not 0 < interference <= 1:
            raise ValueError(f"interference must be in (0, 1], got {interference}")
        self.interference = interference
        self.group_efficiency = group_efficiency  # threads a process's busy roles get together ÷ its threads
        self.env = env
        self.capacity = float(capacity)
        # {busy threads k: capacity with k busy} (epd.plan.parallel); None: ``capacity`` whatever k
        self.curve = sorted((int(k), float(v)) for k, v in (capacity_curve or {}).items())
        # {victim stage: {co-runner stage: speed (≤ 1) of the victim while the co-runner runs in
        # another process}} (epd.plan.parallel.slowdown); missing pairs: 1
        self.slowdown = slowdown or {}
        self.name = name
        self.jobs: list[_Job] = []
        self.last = env.now
        self.busy_s = 0.0
        self.work_s = 0.0
        self._changed = env.event()
        env.process(self._loop())

    def run(self, work: float, demand: float = 1.0, owner: str = "", group: str = "",
            group_cap: float = 0.0, stage: str = "") -> simpy.Event:
        """An event that fires when ``work`` seconds of solo work are done under sharing."""
        done = self.env.event()
        if work <= 0:
            done.succeed()
            return done
        self._advance()
        self.jobs.append(_Job(work, demand, done, owner, group or owner, group_cap, stage))
        self.work_s += work
        if not self._changed.triggered:
            self._changed.succeed()
        return done

    def speeds(self) -> list[float]:
        """Each running job's speed (solo = 1): its process's share of its own threads, times the
        device's share of its capacity among the processes' used threads."""
        demand: dict[str, float] = {}
        cap: dict[str, float] = {}
        owners: dict[str, set[str]] = {}
        for j in self.jobs:
            demand[j.group] = demand.get(j.group, 0.0) + j.demand
            cap[j.group] = j.group_cap
            owners.setdefault(j.group, set()).add(j.owner)
        used = {g: min(d, cap[g] * (self.group_efficiency if len(owners[g]) > 1 else 1.0)) if cap[g] > 0 else d
                for g, d in demand.items()}
        total = sum(used.values())
        host = min(1.0, self.capacity_at(total) / total) if total > 0 else 1.0
        if self.interference < 1.0 and len({j.owner for j in self.jobs}) > 1:
            host *= self.interference
        return [host * used[j.group] / demand[j.group] * self._slowed(j) for j in self.jobs]

    def _slowed(self, job: _Job) -> float:
        """``job``'s speed factor from the stages running in other processes: the strongest
        measured pairwise slowdown among them (1 when none was measured)."""
        row = self.slowdown.get(job.stage)
        if not row:
            return 1.0
        return min((row.get(j.stage, 1.0) for j in self.jobs if j.group != job.group), default=1.0)

    def capacity_at(self, busy: float) -> float:
        """Work per second (in solo units) with ``busy`` threads runnable: the measured curve,
        linear between its points and flat past its last; ``capacity`` without a curve."""
        if not self.curve:
            return self.capacity
        if busy <= self.curve[0][0]:
            return min(busy, self.curve[0][1])
        for (k0, c0), (k1, c1) in zip(self.curve, self.curve[1:], strict=False):
            if busy <= k1:
                return c0 + (c1 - c0) * (busy - k0) / (k1 - k0)
        return self.curve[-1][1]

    def speed(self) -> float:
        """The speed of the slowest running job (1 when idle)."""
        return min(self.speeds(), default=1.0)

    def _advance(self) -> None:
        dt = self.env.now - self.last
        if dt > 0 and self.jobs:
            for j, s in zip(self.jobs, self.speeds(), strict=True):
                j.remaining -= dt * s
            self.busy_s += dt
        self.last = self.env.now

    def _loop(self):
        env = self.env
        while True:
            if not self.jobs:
                yield self._changed
                self._changed = env.event()
                continue
            dt = max(0.0, min(j.remaining / s for j, s in zip(self.jobs, self.speeds(), strict=True)))
            yield env.timeout(dt) | self._changed
            if self._changed.triggered:
                self._changed = env.event()
            self._advance()
            finished = [j for j in self.jobs if j.remaining <= EPS]
            if finished:
                self.jobs = [j for j in self.jobs if j not in finished]
                for j in finished:
                    j.done.succeed()
