"""KV block accounting: which block ids are free, which are used (no tensors, no torch).

Plain integers, as in nano-vllm's block manager: a deque of free ids and a set of used ids, with
``can_allocate`` before ``allocate`` so the caller decides first. The decode scheduler
(:mod:`epd.engine.decode_scheduler`) and the planner's simulator (:mod:`epd.plan.stages`) both
run on it, so the simulated pool admits and preempts exactly as the real one does.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks for the request."""


class BlockAllocator:
    """Free/used accounting of ``num_blocks`` block ids (exact integers)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.used_ids: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks. Raises :class:`OutOfBlocks` (and takes nothing) if fewer are free."""
        if not self.can_allocate(n):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self.free_ids)} free of {self.num_blocks}")
        ids = [self.free_ids.popleft() for _ in range(n)]
        self.used_ids.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        """Return blocks. Raises ``ValueError`` on a block that is not in use (double free)."""
        bad = [i for i in ids if i not in self.used_ids]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"freeing KV blocks not in use: {bad}")
        for i in ids:
            self.used_ids.remove(i)
            self.free_ids.append(i)
