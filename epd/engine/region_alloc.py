"""First-fit byte-range allocator over a registered memory region.

Used for the encoder's feature pool and prefill's feature/KV staging area: both are one
transfer-registered region (registration is expensive, so it happens once) carved into
variable-size ranges. Free ranges are kept sorted and coalesced on free. Only offsets are
handled here: the region itself lives on the process device (``EPD_DEVICE``), and the ranges
are views of it used in place.
"""

from __future__ import annotations

import bisect


class RegionFull(MemoryError):
    """No free range is large enough."""


class RangeAllocator:
    """Allocates ``[offset, offset + nbytes)`` ranges inside ``capacity`` bytes.

    Args:
        capacity: region size in bytes.
        alignment: every offset and size is rounded up to this many bytes (default 256,
            enough for any dtype and for DMA-friendly transfers).
    """

    def __init__(self, capacity: int, alignment: int = 256) -> None:
        self.capacity = capacity
        self.alignment = alignment
        self._free: list[tuple[int, int]] = [(0, capacity)]  # sorted (offset, size)
        self._used: dict[int, int] = {}  # offset -> size

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def num_allocations(self) -> int:
        return len(self._used)

    def _round(self, n: int) -> int:
        return max(self.alignment, -(-n // self.alignment) * self.alignment)

    def allocate(self, nbytes: int) -> int:
        """Reserve ``nbytes`` and return the range's offset.

        Raises:
            RegionFull: no free range fits (the caller may evict and retry).
        """
        size = self._round(nbytes)
        for i, (off, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, free - size)
                self._used[off] = size
                return off
        raise RegionFull(f"no free range of {size} bytes ({self.capacity - self.used_bytes} free in total)")

    def free(self, offset: int) -> None:
        """Release the range at ``offset``. Raises ``KeyError`` if it is not allocated."""
        size = self._used.pop(offset)
        i = bisect.bisect_left(self._free, (offset, 0))
        self._free.insert(i, (offset, size))
        # coalesce with the right neighbour, then the left one
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]
