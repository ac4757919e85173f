"""Ids of requests aborted before (some of) their messages arrived.

Messages of one request reach a stage from different senders (gateway, encoder, prefill)
with no ordering between them, so an ``AbortRequest`` can overtake the message that would
have created the request's state. A stage remembers such ids for a while and drops late
messages for them instead of allocating for a request nobody waits for.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class Tombstones:
    """A time-bounded set of request ids.

    Args:
        ttl_s: how long an id is remembered (seconds; longer than any message delay).
        max_size: bound on memory; the oldest ids go first.
    """

    def __init__(self, ttl_s: float = 60.0, max_size: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._ids: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._ids[request_id] = now
        self._ids.move_to_end(request_id)
        self.purge(now)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def purge(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        while self._ids:
            rid, t = next(iter(self._ids.items()))
            if now - t <= self.ttl_s and len(self._ids) <= self.max_size:
                break
            del self._ids[rid]
