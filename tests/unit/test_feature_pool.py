"""Encoder feature pool: exact offsets, LRU eviction order, leases, Redis-metadata callback."""

import time

import pytest
import torch

from epd.engine.region_alloc import RegionFull
from services.encoder.core import FeaturePool

FUTURE = time.time() + 3600


def _feat(value: float, rows: int = 16) -> torch.Tensor:
    return torch.full((rows, 4), value, dtype=torch.float32)  # 16 x 4 x 4 B = 256 B = one aligned slot


def _pool(slots: int = 4):
    evicted: list[str] = []
    pool = FeaturePool(torch.zeros(slots * 256, dtype=torch.uint8), on_evict=evicted.append)
    return pool, evicted


def test_put_places_bytes_and_metadata():
    pool, evicted = _pool()
    e = pool.put("a", _feat(1.5), [1, 8, 8], lease_until=0)
    assert (e.offset, e.nbytes, e.dtype, e.shape, e.grid_thw) == (0, 256, "float32", [16, 4], [1, 8, 8])
    assert torch.equal(pool.region[0:256].view(torch.float32).view(16, 4), _feat(1.5))
    assert pool.put("b", _feat(2.0), [1, 8, 8], 0).offset == 256
    assert len(pool) == 2 and pool.used_bytes == 512 and evicted == []


def test_lru_eviction_order_and_callback():
    pool, evicted = _pool(slots=3)
    for i, h in enumerate("abc"):
        pool.put(h, _feat(i), [1, 8, 8], 0)
    assert pool.lookup("a", 0) is not None  # a becomes most recently used: order b, c, a
    d = pool.put("d", _feat(9), [1, 8, 8], 0)
    assert evicted == ["b"] and d.offset == 256  # b's slot reused
    assert list(pool.entries) == ["c", "a", "d"]
    pool.put("e", _feat(8), [1, 8, 8], 0)
    assert evicted == ["b", "c"] and pool.lookup("c", 0) is None


def test_eviction_makes_room_for_a_larger_entry():
    pool, evicted = _pool(slots=4)
    for i, h in enumerate("abcd"):
        pool.put(h, _feat(i), [1, 8, 8], 0)
    big = pool.put("big", _feat(7, rows=32), [1, 16, 8], 0)  # 512 B: needs two adjacent free slots
    assert evicted == ["a", "b"] and big.offset == 0


def test_leased_entries_are_not_evicted():
    pool, evicted = _pool(slots=2)
    pool.put("a", _feat(0), [1, 8, 8], FUTURE)
    pool.put("b", _feat(1), [1, 8, 8], 0)
    pool.put("c", _feat(2), [1, 8, 8], 0)  # a is older but leased: b goes
    assert evicted == ["b"]
    pool.lookup("c", FUTURE)
    with pytest.raises(RegionFull):
        pool.put("d", _feat(3), [1, 8, 8], 0)
    assert evicted == ["b"] and set(pool.entries) == {"a", "c"}


def test_same_hash_keeps_entry_and_extends_lease():
    pool, evicted = _pool(slots=2)
    first = pool.put("a", _feat(1), [1, 8, 8], 0)
    again = pool.put("a", _feat(5), [1, 8, 8], FUTURE)  # same bytes → same features: nothing copied
    assert again is first and again.offset == 0 and again.leased_until == FUTURE
    assert torch.equal(pool.region[0:256].view(torch.float32).view(16, 4), _feat(1))
    assert pool.used_bytes == 256 and evicted == []


def test_oversized_features_fail_without_evicting():
    pool, evicted = _pool(slots=2)
    pool.put("a", _feat(0), [1, 8, 8], 0)
    with pytest.raises(RegionFull, match="exceed the whole pool"):
        pool.put("huge", _feat(0, rows=48), [1, 24, 8], 0)
    assert evicted == [] and list(pool.entries) == ["a"]


def test_clear_returns_hashes_and_frees_everything():
    pool, _ = _pool()
    pool.put("a", _feat(0), [1, 8, 8], FUTURE)
    pool.put("b", _feat(1), [1, 8, 8], 0)
    assert pool.clear() == ["a", "b"] and len(pool) == 0 and pool.used_bytes == 0
