"""Which peers are alive, from registry snapshots (DESIGN.md §3, §9: failure detection that acts).

Every stage and the gateway pin, for each in-flight request, the instances it depends on
(``instance_id`` + ``incarnation`` as seen when the request arrived). :class:`PeerWatch`
answers "is that incarnation gone?" from the registry snapshots it is fed:

- a different incarnation under the same id: the process was restarted — gone at once;
- the id absent from the registry: gone once it has been absent for ``grace_s`` (default two
  heartbeat periods). A heartbeat key expires ``EPD_INSTANCE_TTL_S`` after the last beat, so a
  killed instance is declared gone about ``TTL + grace`` after it died (≈ 7 s with the
  defaults, under the 2×TTL target). The grace keeps a Redis restart — an empty registry until
  every instance's next beat re-registers it — from looking like the death of everyone.

A cleanly stopped instance deregisters only after it failed (and reported) whatever it held,
so its requests are already gone when it is declared gone. A draining instance keeps beating
with ``draining: true``: alive, just not chosen for new work.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from epd.registry.registry import InstanceInfo


@dataclass(frozen=True)
class PeerRef:
    """One incarnation of an instance that a request depends on."""

    instance_id: str
    incarnation: str


class PeerWatch:
    """Liveness of instances from successive registry snapshots. Thread-safe.

    Args:
        grace_s: how long an id may be missing from the registry before it counts as gone.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._current: dict[str, InstanceInfo] = {}
        self._missing_since: dict[str, float] = {}  # id -> monotonic time it was first missed
        self._gone: dict[str, str] = {}  # id -> incarnation declared gone (until it reappears)
        self._by_inbox: dict[str, InstanceInfo] = {}
        self.version = 0  # bumped when the set of live incarnations changes

    def update(self, snapshot: list[InstanceInfo], now: float | None = None) -> list[PeerRef]:
        """Take a fresh snapshot; returns the incarnations newly declared gone."""
        now = time.monotonic() if now is None else now
        fresh = {i.instance_id: i for i in snapshot}
        gone: list[PeerRef] = []
        with self._lock:
            for iid, old in self._current.items():
                new = fresh.get(iid)
                if new is not None and new.incarnation != old.incarnation:
                    gone.append(PeerRef(iid, old.incarnation))  # restarted: the old life is over
                    self._missing_since.pop(iid, None)
                elif new is None:
                    since = self._missing_since.setdefault(iid, now)
                    if now - since >= self.grace_s:
                        gone.append(PeerRef(iid, old.incarnation))
                        self._missing_since.pop(iid, None)
                    else:
                        fresh[iid] = old  # keep it until the grace has passed
                else:
                    self._missing_since.pop(iid, None)
            for ref in gone:
                self._gone[ref.instance_id] = ref.incarnation
                if ref.instance_id in fresh and fresh[ref.instance_id].incarnation == ref.incarnation:
                    del fresh[ref.instance_id]
            for iid, info in fresh.items():
                if self._gone.get(iid) not in (None, info.incarnation):
                    del self._gone[iid]  # a new life under the old id
            changed = set(fresh) != set(self._current) or bool(gone)
            self._current = fresh
            self._by_inbox = {i.inbox: i for i in fresh.values()}
            if changed:
                self.version += 1
        return gone

    def snapshot(self) -> list[InstanceInfo]:
        """The live view: the last snapshot plus instances missing for less than the grace (a
        Redis restart does not empty it), sorted by id."""
        with self._lock:
            return sorted(self._current.values(), key=lambda i: i.instance_id)

    def ref(self, instance_id: str) -> PeerRef | None:
        """The live incarnation of ``instance_id`` (``None``: not registered, not tracked)."""
        with self._lock:
            info = self._current.get(instance_id)
        return PeerRef(instance_id, info.incarnation) if info is not None else None

    def ref_at(self, inbox: str) -> PeerRef | None:
        """The live incarnation listening on ZeroMQ ``inbox`` (``None``: unknown address)."""
        with self._lock:
            info = self._by_inbox.get(inbox)
        return PeerRef(info.instance_id, info.incarnation) if info is not None else None

    def is_gone(self, ref: PeerRef | None) -> bool:
        """True when ``ref``'s incarnation has been declared gone (``None`` is never gone)."""
        if ref is None:
            return False
        with self._lock:
            info = self._current.get(ref.instance_id)
            if info is not None:
                return info.incarnation != ref.incarnation
            return self._gone.get(ref.instance_id) == ref.incarnation
