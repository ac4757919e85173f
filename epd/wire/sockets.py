"""ZeroMQ plumbing: one PULL inbox per process, PUSH outboxes to peers (DESIGN.md §2).

Why PUSH/PULL on every link: all control traffic is one-way events keyed by
``request_id`` (a request's state lives in the receiving stage, not in a socket), every
process has exactly one inbox address to publish in the registry, and a PULL socket fairly
queues any number of senders. Replies (``KvAllocated``) are just messages sent back to the
inbox named in ``reply_to``. ROUTER/DEALER would add identity frames and buy nothing here.

Outboxes set ``IMMEDIATE`` so a message is only queued on a completed connection: sending to
a peer that is down raises :class:`PeerUnavailable` after ``send_timeout_ms`` instead of
piling up in a queue forever.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import zmq

from epd.wire.codec import pack, unpack

logger = logging.getLogger(__name__)


class PeerUnavailable(ConnectionError):
    """A message could not be handed to a connected peer within the send timeout."""


class WireTap:
    """Appends ``sender payload_type frame0_bytes blob_bytes...`` per sent message to a file.

    Used by tests to prove that control messages stay small (no tensor rides ZeroMQ).
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()

    def record(self, sender: str, frames: list[bytes]) -> None:
        if self._path is None:
            return
        _, field, _ = unpack(frames[0])
        line = " ".join([sender, field, *(str(len(f)) for f in frames)]) + "\n"
        with self._lock, open(self._path, "a") as fh:
            fh.write(line)


def bind_pull(sock: zmq.Socket, host: str, port: int = 0) -> str:
    """Bind a PULL socket on ``host:port`` (0 = any free port); returns its ``tcp://`` address."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    if port:
        sock.bind(f"tcp://{host}:{port}")
    else:
        port = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{port}"


class Inbox:
    """The process's PULL socket.

    Args:
        ctx: ZeroMQ context.
        host: interface to bind and the address peers use.
        port: 0 picks a free port.
    """

    def __init__(self, ctx: zmq.Context, host: str, port: int = 0) -> None:
        self.sock = ctx.socket(zmq.PULL)
        self.address = bind_pull(self.sock, host, port)

    def recv(self, timeout_ms: int) -> list[bytes] | None:
        """Next message's frames, or ``None`` when nothing arrived within ``timeout_ms``."""
        if self.sock.poll(timeout_ms, zmq.POLLIN):
            return self.sock.recv_multipart(copy=True)
        return None

    def close(self) -> None:
        self.sock.close(0)


class Outbox:
    """PUSH sockets to peers, one per address, created on first use. Not thread-safe.

    Args:
        ctx: ZeroMQ context.
        sender: this instance's id, stamped on every envelope.
        send_timeout_ms: how long to wait for a peer connection before :class:`PeerUnavailable`.
        tap: optional :class:`WireTap`.
    """

    def __init__(
        self, ctx: zmq.Context, sender: str, send_timeout_ms: int = 3000, tap: WireTap | None = None
    ) -> None:
        self.ctx = ctx
        self.sender = sender
        self.send_timeout_ms = send_timeout_ms
        self.tap = tap or WireTap(None)
        self._socks: dict[str, zmq.Socket] = {}

    def _sock(self, address: str) -> zmq.Socket:
        sock = self._socks.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(address)
            self._socks[address] = sock
        return sock

    def send(self, address: str, msg: object, blobs: list[bytes] | None = None) -> None:
        """Send one payload message (wrapped in an Envelope) plus optional media blobs.

        Raises:
            PeerUnavailable: no connection to ``address`` within ``send_timeout_ms``.
        """
        frames = [pack(msg, self.sender), *(blobs or [])]
        sock = self._sock(address)
        deadline = time.monotonic() + self.send_timeout_ms / 1000
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if sock.poll(remaining_ms, zmq.POLLOUT):
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    pass
            if time.monotonic() >= deadline:
                # Drop the socket: its queued connection attempt belongs to a dead peer.
                self._socks.pop(address).close(0)
                raise PeerUnavailable(f"no connection to {address} within {self.send_timeout_ms} ms")
        self.tap.record(self.sender, frames)

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
