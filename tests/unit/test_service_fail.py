"""A stage that fails a request always tells the request's ``reply_to`` (epd.service.ServiceProc.fail).

The scenario behind it: a gateway restarts under the same instance id; a stage whose peer view
still holds the old incarnation pins a new request to that old life; the next refresh declares
the old life gone and the stage drops the request. Before, the stage then sent nothing, taking
the lost peer for the gateway that would receive the message, and the live gateway's request
waited until its deadline: one way to the "client request still running" that
``test_redis_restart_under_traffic`` has shown now and then (not reproduced; the test now names
the stuck request and its log lines when it happens).
"""

from __future__ import annotations

import queue
from collections import Counter
from types import SimpleNamespace

from epd.registry.peers import PeerWatch
from epd.registry.registry import InstanceInfo
from epd.service import ServiceProc
from epd.wire.gen import epd_pb2 as pb

OLD_INBOX, NEW_INBOX = "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002"


def _gateway(incarnation: str, inbox: str) -> InstanceInfo:
    return InstanceInfo("gateway", ["gateway"], inbox, incarnation=incarnation)


class _Stage:
    """The parts of :class:`ServiceProc` that pin, drop and fail requests, without sockets."""

    role = "prefill"
    fail = ServiceProc.fail
    track = ServiceProc.track
    _handle_failures = ServiceProc._handle_failures
    _safely = ServiceProc._safely

    def __init__(self, peers: PeerWatch) -> None:
        self.peers = peers
        self.deps: dict = {}
        self.sent: list[tuple[str, object]] = []
        self.requests: dict[str, str] = {}  # request id -> reply_to
        self.counters: Counter = Counter()
        self._send_failures: queue.SimpleQueue = queue.SimpleQueue()
        self._peers_version = peers.version
        self._next_sweep = 0.0
        self.config = SimpleNamespace(heartbeat_s=0.5)

    def send(self, address: str, msg: object) -> None:
        self.sent.append((address, msg))

    def has_request(self, request_id: str) -> bool:
        return request_id in self.requests

    def drop_request(self, request_id: str, code: int, reason: str, peer: str = "") -> None:
        self.fail(self.requests.pop(request_id), request_id, code, reason, peer=peer)


def test_a_request_pinned_to_a_stale_gateway_life_is_failed_back_not_dropped():
    peers = PeerWatch(grace_s=1.5)
    peers.update([_gateway("old", OLD_INBOX)], now=0.0)
    stage = _Stage(peers)
    # the restarted gateway sends a request before this stage's view has seen it
    stage.requests["r1"] = NEW_INBOX
    stage.track("r1", ids=("gateway",))
    peers.update([_gateway("new", NEW_INBOX)], now=0.5)  # the view catches up: "old" is gone
    stage._handle_failures()
    assert not stage.has_request("r1")
    [(address, msg)] = stage.sent
    assert address == NEW_INBOX and isinstance(msg, pb.RequestFailed)
    assert msg.request_id == "r1" and msg.code == pb.UNAVAILABLE and msg.peer == "gateway"


def test_failure_goes_to_reply_to_whoever_was_lost():
    stage = _Stage(PeerWatch(grace_s=1.5))
    for peer in ("gateway", NEW_INBOX, "decode-0", ""):
        stage.sent.clear()
        stage.fail(NEW_INBOX, "r", pb.UNAVAILABLE, "lost", peer=peer)
        assert [(a, m.request_id, m.stage, m.peer) for a, m in stage.sent] == [(NEW_INBOX, "r", "prefill", peer)]
    stage.sent.clear()
    stage.fail("", "r", pb.UNAVAILABLE, "no reply address")
    assert stage.sent == []
