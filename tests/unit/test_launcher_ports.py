"""The launcher's port picks and readiness probe: a ZeroMQ socket on the gateway's port must not
crash the probe, and the picks stay out of the range where ZeroMQ sockets bind."""
from __future__ import annotations

import socket
import threading

from epd.launcher import ZMQ_RANDOM_PORTS, free_port, gateway_ready


def _kernel_range() -> range:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
        lo, hi = (int(x) for x in fh.read().split())
    return range(lo, hi + 1)


def test_free_port_is_bindable_and_outside_zeromqs_random_range():
    below = _kernel_range().start < ZMQ_RANDOM_PORTS.start
    for _ in range(40):
        port = free_port()
        if below:
            assert port not in ZMQ_RANDOM_PORTS
        with socket.socket() as s:  # free: binds
            s.bind(("127.0.0.1", port))


def test_gateway_ready_is_false_when_a_zeromq_peer_answers_on_the_port():
    """A service's ZeroMQ socket on the port picked for the gateway answers HTTP with its ZMTP
    signature and, having read no greeting, hangs up: http.client raises BadStatusLine (not an
    OSError), which the probe must read as "not ready" rather than crash ``epd up``."""
    zmtp_signature = b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f"  # what a bound PULL socket sends
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(zmtp_signature)
            conn.recv(1024)

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        assert gateway_ready(f"http://127.0.0.1:{port}", {"encoder": 1}) is False
    finally:
        t.join(5)
        srv.close()
