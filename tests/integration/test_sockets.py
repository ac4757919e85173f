import time

import pytest
import zmq

from epd.wire.gen import epd_pb2 as pb
from epd.wire.sockets import Inbox, Outbox, PeerUnavailable, WireTap
from tests.conftest import free_port


def test_push_pull_roundtrip_with_blob_and_tap(tmp_path):
    ctx = zmq.Context.instance()
    inbox = Inbox(ctx, "127.0.0.1")
    tap = tmp_path / "tap.log"
    out = Outbox(ctx, "gw", tap=WireTap(tap))
    out.send(inbox.address, pb.AbortRequest(request_id="r", reason="x"), blobs=[b"\x89PNG..."])
    frames = inbox.recv(2000)
    assert frames is not None and frames[1] == b"\x89PNG..."
    assert tap.read_text().split() == ["gw", "abort_request", str(len(frames[0])), "7"]
    out.close()
    inbox.close()


def test_send_to_dead_peer_fails_its_future_instead_of_queueing():
    failures = []
    out = Outbox(zmq.Context.instance(), "gw", send_timeout_ms=200,
                 on_fail=lambda addr, rid, field, why: failures.append((rid, field)))
    t0 = time.monotonic()
    fut = out.send(f"tcp://127.0.0.1:{free_port()}", pb.AbortRequest(request_id="r"))
    assert time.monotonic() - t0 < 0.1  # the caller is never blocked
    with pytest.raises(PeerUnavailable):
        fut.result(timeout=5)
    assert failures == [("r", "AbortRequest")]
    assert out.pending() == 0
    out.close()


def test_dead_peer_does_not_delay_messages_to_a_live_one():
    ctx = zmq.Context.instance()
    inbox = Inbox(ctx, "127.0.0.1")
    out = Outbox(ctx, "gw", send_timeout_ms=1500)
    dead = [out.send(f"tcp://127.0.0.1:{free_port()}", pb.AbortRequest(request_id=f"d{i}")) for i in range(3)]
    t0 = time.monotonic()
    out.send(inbox.address, pb.AbortRequest(request_id="live"))
    frames = inbox.recv(1000)
    assert frames is not None and time.monotonic() - t0 < 0.5
    assert not any(f.done() for f in dead)  # still waiting for their peer, not blocking anyone
    for f in dead:
        with pytest.raises(PeerUnavailable):
            f.result(timeout=5)
    out.close()
    inbox.close()


@pytest.mark.parametrize("address", ["not-an-endpoint", "tcp://", "tcp://host-that-does-not-resolve.invalid:1"])
def test_invalid_address_fails_the_message_not_the_caller(address):
    ctx = zmq.Context.instance()
    inbox = Inbox(ctx, "127.0.0.1")
    out = Outbox(ctx, "gw", send_timeout_ms=300)
    fut = out.send(address, pb.TokenDelta(request_id="r"))
    with pytest.raises(PeerUnavailable):
        fut.result(timeout=5)
    out.send(inbox.address, pb.AbortRequest(request_id="after")).result(timeout=5)  # the outbox still works
    assert inbox.recv(1000) is not None
    out.close()
    inbox.close()


def test_full_peer_queue_fails_at_once():
    out = Outbox(zmq.Context.instance(), "gw", send_timeout_ms=2000, queue_max=2)
    addr = f"tcp://127.0.0.1:{free_port()}"
    futs = [out.send(addr, pb.AbortRequest(request_id=str(i))) for i in range(3)]
    with pytest.raises(PeerUnavailable, match="already queued"):
        futs[2].result(timeout=0.5)
    out.close()
