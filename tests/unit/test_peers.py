from epd.registry.peers import PeerRef, PeerWatch
from epd.registry.registry import InstanceInfo


def _info(iid: str, inc: str, inbox: str = "") -> InstanceInfo:
    return InstanceInfo(iid, ["decode"], inbox or f"tcp://127.0.0.1:{abs(hash(iid)) % 60000 + 1}", incarnation=inc)


def test_restart_under_the_same_id_is_gone_at_once():
    w = PeerWatch(grace_s=2.0)
    w.update([_info("d0", "a")], now=0.0)
    old = w.ref("d0")
    assert old == PeerRef("d0", "a") and not w.is_gone(old)
    assert w.update([_info("d0", "b")], now=0.5) == [old]
    assert w.is_gone(old) and not w.is_gone(w.ref("d0"))


def test_absence_counts_only_after_the_grace():
    w = PeerWatch(grace_s=2.0)
    w.update([_info("d0", "a"), _info("p0", "x")], now=0.0)
    ref = w.ref("d0")
    v = w.version
    assert w.update([_info("p0", "x")], now=1.0) == []  # missing, within the grace: still alive
    assert not w.is_gone(ref) and w.ref("d0") == ref and w.version == v
    assert w.update([_info("p0", "x")], now=3.1) == [ref]
    assert w.is_gone(ref) and w.ref("d0") is None and w.version > v


def test_a_registry_gap_shorter_than_the_grace_kills_nobody():
    """A Redis restart empties the registry until every instance's next beat."""
    w = PeerWatch(grace_s=1.5)
    snapshot = [_info("d0", "a"), _info("p0", "x")]
    w.update(snapshot, now=0.0)
    refs = [w.ref("d0"), w.ref("p0")]
    assert w.update([], now=0.4) == []
    assert [i.instance_id for i in w.snapshot()] == ["d0", "p0"]  # the router keeps choosing them
    assert w.update(snapshot, now=1.2) == []
    assert not any(w.is_gone(r) for r in refs)
    assert w.update([], now=2.0) == [] and w.update([], now=3.6) == refs  # a real outage ends it


def test_stopped_then_resumed_instance_is_alive_again():
    w = PeerWatch(grace_s=1.0)
    w.update([_info("d0", "a")], now=0.0)
    ref = w.ref("d0")
    w.update([], now=0.5)
    assert w.update([], now=1.6) == [ref]  # SIGSTOP: heartbeat expired, declared gone
    w.update([_info("d0", "a")], now=5.0)  # SIGCONT: beats again under the same incarnation
    assert w.ref("d0") == ref and not w.is_gone(w.ref("d0"))


def test_lookup_by_inbox_and_unknown_refs_are_never_gone():
    w = PeerWatch(grace_s=1.0)
    w.update([_info("gw", "g", inbox="tcp://127.0.0.1:5555")], now=0.0)
    assert w.ref_at("tcp://127.0.0.1:5555") == PeerRef("gw", "g")
    assert w.ref_at("tcp://127.0.0.1:1") is None
    assert not w.is_gone(None)
