import pytest
import torch

from epd.engine.kv_pool import BlockAllocator, KvLayout, KvPool, OutOfBlocks, runs, transfer_plan


def test_allocator_exact_ids_and_accounting():
    a = BlockAllocator(6)
    assert a.allocate(2) == [0, 1]
    assert a.allocate(3) == [2, 3, 4]
    assert a.num_free == 1
    assert not a.can_allocate(2)
    with pytest.raises(OutOfBlocks):
        a.allocate(2)
    assert a.num_free == 1  # a failed allocate takes nothing
    a.free([0, 1])
    assert a.allocate(3) == [5, 0, 1]
    with pytest.raises(ValueError):
        a.free([0, 0])


def test_runs_merge_consecutive_blocks():
    assert runs([4, 5, 6, 9]) == [(0, 4, 3), (3, 9, 1)]
    assert runs([3]) == [(0, 3, 1)]
    assert runs([]) == []
    assert runs([2, 1]) == [(0, 2, 1), (1, 1, 1)]


def test_layout_offsets():
    lay = KvLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=3)
    assert lay.block_bytes == 4 * 2 * 3 * 4
    assert lay.offset(0, 0, 0) == 0
    assert lay.offset(0, 1, 0) == 8 * 96
    assert lay.offset(1, 0, 5) == (2 * 8 + 5) * 96
    assert lay.nbytes == 2 * 2 * 8 * 96
    assert lay.blocks_for(9) == 3


def test_transfer_plan_one_segment_per_layer_kv_run():
    dst = KvLayout(2, 8, 4, 2, 3)
    src = dst.with_blocks(3)
    local, remote, lengths = transfer_plan(src, dst, [4, 5, 7], range(2))
    bb = dst.block_bytes
    assert lengths == [2 * bb, bb] * 4
    assert local[:2] == [0, 2 * bb]
    assert remote[:2] == [4 * bb, 7 * bb]
    assert remote[2] == dst.offset(0, 1, 4)


def test_scatter_gather_roundtrip_and_transfer_plan_copy():
    torch.manual_seed(0)
    dst = KvPool(KvLayout(3, 10, 4, 2, 5))
    kv = [(torch.randn(2, 10, 5), torch.randn(2, 10, 5)) for _ in range(3)]
    staging = KvPool(dst.layout.with_blocks(3))
    staging.scatter(kv, [0, 1, 2])
    # emulate the one-sided write with the plan's byte segments
    src_bytes = staging.kv.view(-1).view(torch.uint8)
    dst_bytes = dst.kv.view(-1).view(torch.uint8)
    table = [7, 8, 2]
    for lo, ro, n in zip(*transfer_plan(staging.layout, dst.layout, table, range(3)), strict=True):
        dst_bytes[ro : ro + n] = src_bytes[lo : lo + n]
    back = dst.gather(table, 10)
    for (k, v), (k2, v2) in zip(kv, back, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
