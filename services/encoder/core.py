"""Encoder core: image decoding, batched vision forward, and the feature pool (no sockets).

Lifecycle of one image: queued (``EncodeRequest``) ▸ decoded ▸ encoded in a batch of up to
``max_images`` ▸ written into the feature pool ▸ recorded in Redis under its ``mm_hash`` ▸
``FeaturesReady`` to the prefill instance, which READs the bytes one-sided.

A pool entry stays *leased* until its request's deadline so it cannot be evicted while a
prefill may still be reading it; after that it is an ordinary cache entry, evicted
least-recently-used when space is needed (its Redis metadata is deleted on eviction).
"""

from __future__ import annotations

import io
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from epd.engine.region_alloc import RangeAllocator, RegionFull

logger = logging.getLogger(__name__)


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image."""


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an encoded image file to RGB.

    Raises:
        ImageDecodeError: not an image, truncated, or more than ``max_pixels`` pixels
            (checked from the header before decoding, so a decompression bomb is never decoded).
    """
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise ImageDecodeError(f"image of {img.width}x{img.height} exceeds {max_pixels} pixels")
        img.load()
        return img.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError…)
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc


@dataclass
class PoolEntry:
    """One image's features in the pool: ``[num_tokens, hidden]`` at ``offset``."""

    mm_hash: str
    offset: int
    nbytes: int
    dtype: str
    shape: list[int]
    grid_thw: list[int]
    leased_until: float = 0.0  # unix seconds; not evictable before


class FeaturePool:
    """Finished image features in a registered byte region, LRU-evicted.

    Args:
        region: uint8 tensor view of the transfer-registered region.
        on_evict: called with the ``mm_hash`` of every evicted entry (deletes Redis metadata).
    """

    def __init__(self, region: torch.Tensor, on_evict=None) -> None:
        self.region = region
        self.alloc = RangeAllocator(region.numel())
        self.entries: OrderedDict[str, PoolEntry] = OrderedDict()
        self.on_evict = on_evict or (lambda mm_hash: None)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def used_bytes(self) -> int:
        return self.alloc.used_bytes

    def lookup(self, mm_hash: str, lease_until: float) -> PoolEntry | None:
        """The entry for ``mm_hash`` (marked most recently used and leased), or ``None``."""
        entry = self.entries.get(mm_hash)
        if entry is not None:
            self.entries.move_to_end(mm_hash)
            entry.leased_until = max(entry.leased_until, lease_until)
        return entry

    def put(self, mm_hash: str, features: torch.Tensor, grid_thw: list[int], lease_until: float) -> PoolEntry:
        """Copy ``features`` ``[num_tokens, hidden]`` into the pool (most recently used, leased).

        An ``mm_hash`` already in the pool keeps its entry (same image bytes, same features):
        it is touched and its lease extended, and nothing is copied — a prefill may be reading
        the old bytes, so they are never overwritten or freed here.

        Raises:
            RegionFull: the features do not fit even after evicting every unleased entry
                (features larger than the whole region fail at once, evicting nothing).
        """
        existing = self.lookup(mm_hash, lease_until)
        if existing is not None:
            return existing
        data = features.detach().contiguous().view(-1).view(torch.uint8)
        offset = self._allocate(data.numel())
        self.region[offset : offset + data.numel()].copy_(data.to(self.region.device))
        entry = PoolEntry(
            mm_hash, offset, data.numel(), str(features.dtype).removeprefix("torch."),
            list(features.shape), list(grid_thw), lease_until,
        )
        self.entries[mm_hash] = entry
        return entry

    def _allocate(self, nbytes: int) -> int:
        if nbytes > self.alloc.capacity:
            raise RegionFull(f"{nbytes} bytes of features exceed the whole pool of {self.alloc.capacity} bytes")
        while True:
            try:
                return self.alloc.allocate(nbytes)
            except RegionFull:
                if not self._evict_one():
                    raise

    def _evict_one(self) -> bool:
        now = time.time()
        for mm_hash, entry in self.entries.items():  # oldest first
            if entry.leased_until <= now:
                del self.entries[mm_hash]
                self.alloc.free(entry.offset)
                self.on_evict(mm_hash)
                logger.debug("evicted features %s (%d bytes)", mm_hash[:12], entry.nbytes)
                return True
        return False

    def clear(self) -> list[str]:
        """Drop every entry; returns their hashes."""
        hashes = list(self.entries)
        for entry in self.entries.values():
            self.alloc.free(entry.offset)
        self.entries.clear()
        return hashes
