"""How ``epd up`` splits the machine's CPU cores among the processes it starts.

torch's intra-op pool is per process and defaults to every core, so three compute processes
on one machine each start a pool of ``cores`` threads and oversubscribe it. The launcher
gives each process its share instead (``EPD_TORCH_THREADS``, ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` in its environment); a user-set ``EPD_TORCH_THREADS`` overrides the
policy with one value for every process.

Pure functions (no torch, no environment reads) so the launcher and tests use them directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction

# Relative CPU work per role on image-heavy load. Measured (DESIGN.md §8: `mid` preset, 2
# threads, one 448×448 image, 290-token prompt): encode 1.3 s, prefill 0.28 s, decode
# 47 ms/step at batch 8 ≈ 6 ms per token per request, i.e. 0.19 s for 32 output tokens and
# 1.5 s for 256. The encoder's share is thus between ~45 % (long outputs) and ~73 % (short
# ones); "as much as prefill and decode together" sits inside that range, on the side that
# does not starve decode, whose per-step latency is the TPOT of every running request.
# Prefill and decode weigh the same: 0.28 s vs 0.19-0.38 s for 32-64 output tokens.
# Encode scales with threads (220 ms on 1 thread, 110 ms on 2), so its extra cores are used.
ROLE_WEIGHTS = {"encoder": 2, "prefill": 1, "decode": 1}


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def split_cores(processes: Sequence[tuple[str, ...]], cores: int) -> list[int]:
    """torch intra-op threads for each process, in the order given.

    Args:
        processes: the roles each process hosts (``ProcessSpec.roles`` of
            :func:`epd.topology.parse_topology`), e.g. ``[("encoder", "prefill"), ("decode",)]``.
            A process hosting several roles (``EP``, ``EPD``) weighs the sum of its roles'
            :data:`ROLE_WEIGHTS`; the members of a ``( … )`` group are separate processes and
            each gets its own share. The device (cpu, cuda, npu) does not matter: these are
            host threads either way.
        cores: usable cores (:func:`usable_cores`), ≥ 1.

    Returns:
        One thread count ≥ 1 per process. With at least as many cores as processes they sum
        to exactly ``cores``: each process's quota is ``cores * w / sum(w)``; a process whose
        quota is under one core gets one, and the cores left are re-split among the others
        by the same rule; then each gets the whole part of its quota and the cores still
        left go to the largest fractional parts (ties: heavier process, then earlier one).
        This is ``max(1, round(quota))`` made to add up: plain rounding can overshoot
        (``EP-D`` on 2 cores: round(1.5) + max(1, round(0.5)) = 3 threads) or leave a core idle.

        With fewer cores than processes (``E-P-D`` on 2 cores) every process gets 1 and the
        sum exceeds ``cores`` (:func:`describe` says so). 1 each is the least bad choice:
        a count cannot be 0 or fractional, and anything above 1 oversubscribes further.
        OpenMP workers spin at the end of each parallel region waiting for their siblings,
        so a pool larger than the cores it actually gets stalls whenever a sibling thread
        is descheduled, while single-threaded processes time-slicing the cores degrade
        gracefully (and the stages of one request run one after another, rarely all at once).

    Raises:
        ValueError: ``cores`` < 1, or a role without a weight.
    """
    if cores < 1:
        raise ValueError(f"cores must be at least 1, got {cores}")
    weights = [sum(ROLE_WEIGHTS[r] for r in roles) for roles in processes]
    if len(weights) >= cores:
        return [1] * len(weights)
    threads = [0] * len(weights)
    rest = list(range(len(weights)))
    budget = cores
    while True:  # quota under one core: pin to 1, re-split the rest (terminates: budget > len(rest))
        total = sum(weights[i] for i in rest)
        small = [i for i in rest if budget * weights[i] < total]
        if not small:
            break
        for i in small:
            threads[i] = 1
        budget -= len(small)
        rest = [i for i in rest if i not in small]
    total = sum(weights[i] for i in rest)
    quota = {i: Fraction(budget * weights[i], total) for i in rest}
    for i in rest:
        threads[i] = int(quota[i])
    left = budget - sum(threads[i] for i in rest)
    for i in sorted(rest, key=lambda i: (threads[i] - quota[i], -weights[i], i))[:left]:
        threads[i] += 1
    return threads


def describe(cores: int, threads: Sequence[tuple[str, int]], override: int = 0) -> str:
    """The launcher's startup line, e.g.
    ``cores: 2 → encoder-0 1, prefill-0 1, decode-0 1 (3 threads on 2 cores: ≥ 1 each; EPD_TORCH_THREADS overrides)``.

    Args:
        cores: usable cores.
        threads: ``(process name, intra-op threads)`` for each compute process.
        override: the user's ``EPD_TORCH_THREADS`` (0: none, the split is the policy's).
    """
    split = ", ".join(f"{name} {n}" for name, n in threads)
    used = sum(n for _, n in threads)
    if override:
        note = f"EPD_TORCH_THREADS={override} for every process"
        if used > cores:
            note += f": {used} threads on {cores} cores"
    elif used > cores:
        note = f"{used} threads on {cores} cores: ≥ 1 each; EPD_TORCH_THREADS overrides"
    else:
        note = "EPD_TORCH_THREADS overrides"
    return f"cores: {cores} → {split} ({note})"
