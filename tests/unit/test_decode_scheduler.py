import pytest

from epd.engine.decode_scheduler import DecodeScheduler, PendingAlloc
from epd.engine.kv_pool import BlockAllocator


def _sched(blocks=10, bs=4, max_batch=8):
    return DecodeScheduler(BlockAllocator(blocks), bs, max_batch)


def test_admission_exact_blocks_fifo_and_watermark():
    s = _sched(blocks=6)
    s.enqueue(PendingAlloc("a", 5, 1e9, "gw"))   # 2 blocks
    s.enqueue(PendingAlloc("b", 12, 1e9, "gw"))  # 3 blocks
    admitted = s.admit()
    assert [(r.request_id, r.block_ids) for r in admitted] == [("a", [0, 1]), ("b", [2, 3, 4])]
    s.start("a", first_token=7, rope_delta=0, deadline=1e9, ctx=None)
    s.enqueue(PendingAlloc("c", 4, 1e9, "gw"))   # 1 block
    # c needs 1 block; 1 free but a running request keeps it as its growth watermark
    assert s.admit() == [] and [q.request_id for q in s.queue] == ["c"]
    s.release("b")
    assert [r.request_id for r in s.admit()] == ["c"]
    assert s.reserved["c"].block_ids == [5]


def test_prompt_that_can_never_fit_is_rejected_at_once():
    s = _sched(blocks=3)
    with pytest.raises(ValueError, match="needs 3 KV blocks"):
        s.enqueue(PendingAlloc("big", 12, 1e9, "gw"))
    s.enqueue(PendingAlloc("x", 1, 1e9, "gw"))
    with pytest.raises(ValueError):
        s.enqueue(PendingAlloc("x", 1, 1e9, "gw"))


def test_running_requests_grow_one_block_at_a_time():
    s = _sched(blocks=4, bs=4)
    s.enqueue(PendingAlloc("a", 4, 1e9, "gw"))
    s.admit()
    req = s.start("a", 1, 0, 1e9, None)
    assert req.past_len == 4 and req.block_ids == [0]
    batch, pre = s.schedule()  # slot 4 needs a second block
    assert batch == [req] and pre == [] and req.block_ids == [0, 1]
    req.past_len = 5
    s.schedule()
    assert req.block_ids == [0, 1]


def test_preemption_takes_the_most_recently_joined_request():
    s = _sched(blocks=3, bs=2)
    for rid in ("old", "young"):
        s.enqueue(PendingAlloc(rid, 2, 1e9, "gw"))
    s.admit()
    old = s.start("old", 1, 0, 1e9, None)
    s.start("young", 1, 0, 1e9, None)
    assert s.allocator.num_free == 1
    batch, pre = s.schedule()
    # old takes the last free block; young cannot grow and is itself the youngest: preempted
    assert batch == [old] and [r.request_id for r in pre] == ["young"]
    assert old.block_ids == [0, 2] and s.allocator.num_free == 1  # young's block came back
    assert list(s.running) == ["old"]


def test_release_and_expiry_free_everything():
    s = _sched(blocks=8)
    s.enqueue(PendingAlloc("q", 4, 5.0, "gw"))
    s.enqueue(PendingAlloc("r", 4, 50.0, "gw"))
    s.admit()
    s.enqueue(PendingAlloc("w", 4, 5.0, "gw"))
    s.start("r", 1, 0, 50.0, None)
    gone = s.expired(now=10.0)
    assert sorted(r.request_id for r in gone) == ["q", "w"]
    assert s.release("r").request_id == "r"
    assert s.release("nope") is None
    assert s.allocator.num_free == 8 and s.num_requests == 0


def test_max_batch_caps_a_step():
    s = _sched(blocks=20, max_batch=2)
    for rid in "abc":
        s.enqueue(PendingAlloc(rid, 3, 1e9, "gw"))
    s.admit()
    for rid in "abc":
        s.start(rid, 1, 0, 1e9, None)
    batch, _ = s.schedule()
    assert [r.request_id for r in batch] == ["a", "b"]
