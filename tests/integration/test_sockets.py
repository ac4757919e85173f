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


def test_send_to_dead_peer_raises_instead_of_queueing():
    out = Outbox(zmq.Context.instance(), "gw", send_timeout_ms=200)
    with pytest.raises(PeerUnavailable):
        out.send(f"tcp://127.0.0.1:{free_port()}", pb.AbortRequest(request_id="r"))
    out.close()
