import pytest

from epd.engine.region_alloc import RangeAllocator, RegionFull


def test_first_fit_and_coalescing():
    a = RangeAllocator(1024, alignment=256)
    assert [a.allocate(100), a.allocate(256), a.allocate(300)] == [0, 256, 512]
    with pytest.raises(RegionFull):
        a.allocate(300)
    a.free(256)
    assert a.allocate(10) == 256
    a.free(0)
    a.free(256)  # coalesces with [0, 256)
    assert a.allocate(512) == 0
    a.free(0)
    a.free(512)
    assert a.used_bytes == 0
    assert a.allocate(1024) == 0
    with pytest.raises(KeyError):
        a.free(100)
