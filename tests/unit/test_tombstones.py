from epd.engine.tombstones import Tombstones


def test_ids_expire_after_ttl_and_size_is_bounded():
    t = Tombstones(ttl_s=10, max_size=2)
    t.add("a", now=0)
    t.add("b", now=5)
    assert "a" in t and "b" in t
    t.purge(now=12)
    assert "a" not in t and "b" in t
    t.add("c", now=13)
    t.add("d", now=14)  # over max_size: the oldest goes
    assert "b" not in t and len(t) == 2
