"""What the services log, read back: the encoder's forward times and the decode's step times
from an ``epd up`` log, for the deployment probe (:mod:`epd.plan.frontend`).

The lines are the services' own INFO records in :func:`epd.bootstrap`'s format (``DATE
TIME,ms LEVEL ROLE LOGGER: message``, local time), behind the supervisor's prefix:

- :data:`services.encoder.engine.ENCODED_MSG` — one per encoder batch, its images and forward in ms;
- :data:`services.decode.core.FINISHED_MSG` — one per finished request, the mean time of the
  decode steps it was in (schedule, forward, sampling).

A probe that compares what a served loop took with what the engine's sample took needs the
forward part timed in the service at the same minute: on a VM whose speed wanders, the
difference otherwise holds the host's state as well as the loop's cost.
"""

from __future__ import annotations

import re
import statistics
from datetime import datetime
from pathlib import Path

_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO "


def _pattern(role: str, msg: str) -> re.Pattern:
    """A regex for ``msg`` (a %-format of ``%s``, ``%d``, ``%.Nf``) logged at INFO by ``role``."""
    body = re.escape(msg).replace("%s", r"(\S+)").replace("%d", r"(\d+)")
    body = re.sub(r"%\\\.\d+f", r"([\\d.]+)", body)
    return re.compile(_STAMP + role + r" \S+: " + body)


def _lines(log: Path, pattern: re.Pattern, windows: list[tuple[float, float]]) -> list[list[tuple]]:
    """Per window (``time.time()`` seconds), the match groups after the stamp of each line in it."""
    out: list[list[tuple]] = [[] for _ in windows]
    with open(log, errors="replace") as f:
        for line in f:
            m = pattern.search(line)
            if not m:
                continue
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1e3
            for i, (t0, t1) in enumerate(windows):
                if t0 <= at <= t1:
                    out[i].append(m.groups()[2:])
    return out


def encoder_forwards(log: Path, windows: list[tuple[float, float]]) -> list[list[float]]:
    """Per window, the milliseconds per image of each forward the encoder logged in it (stamped
    when the forward ended; a batch of n images gives its time ÷ n)."""
    from services.encoder.engine import ENCODED_MSG

    return [[float(ms) / int(n) for n, ms in found]
            for found in _lines(log, _pattern("encoder", ENCODED_MSG), windows)]


def decode_steps(log: Path, windows: list[tuple[float, float]]) -> list[list[float]]:
    """Per window, the mean decode step (ms) of each request that finished in it."""
    from services.decode.core import FINISHED_MSG

    return [[float(ms) for _, _, _, ms in found] for found in _lines(log, _pattern("decode", FINISHED_MSG), windows)]


def median_by_window(per_window: list[list[float]], least: int = 3) -> tuple[float | None, list[float | None]]:
    """``(median of every value, [median of each window or None])``; the first is None with fewer
    than ``least`` values in all."""
    every = [v for w in per_window for v in w]
    return (statistics.median(every) if len(every) >= least else None,
            [statistics.median(w) if w else None for w in per_window])
