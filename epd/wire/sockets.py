"""ZeroMQ plumbing: one PULL inbox per process, PUSH outboxes to peers (DESIGN.md §2).

Why PUSH/PULL on every link: all control traffic is one-way events keyed by
``request_id`` (a request's state lives in the receiving stage, not in a socket), every
process has exactly one inbox address to publish in the registry, and a PULL socket fairly
queues any number of senders. Replies (``KvAllocated``) are just messages sent back to the
inbox named in ``reply_to``. ROUTER/DEALER would add identity frames and buy nothing here.

Sends never block the caller (DESIGN.md §9). :meth:`Outbox.send` signs and enqueues; one
sender thread owns the PUSH sockets and keeps a bounded queue per peer. Outboxes set
``IMMEDIATE``, so ZeroMQ hands a message only to a completed connection: a message to a peer
that is down waits in its peer's queue, and fails (its future raises :class:`PeerUnavailable`,
``on_fail`` is called) once it has waited ``send_timeout_ms`` or the queue is full. A dead or
slow peer therefore delays only the messages addressed to it. An address that is not a valid
ZeroMQ endpoint fails its message the same way instead of raising into the caller.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
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


@dataclass
class _Pending:
    frames: list
    future: Future
    request_id: str
    field: str
    deadline: float  # monotonic


class Outbox:
    """PUSH sockets to peers behind one sender thread; :meth:`send` never blocks. Thread-safe.

    Args:
        ctx: ZeroMQ context.
        sender: this instance's id, stamped on every envelope.
        send_timeout_ms: how long a message may wait for its peer's connection before it fails.
        tap: optional :class:`WireTap`.
        signer: optional ``epd.wire.auth.Signer``; appends the MAC frame to every message.
        queue_max: messages waiting per peer; one more fails at once.
        on_fail: ``on_fail(address, request_id, payload field, reason)`` for every message that
            failed, called from the sender thread (keep it short and thread-safe).
    """

    idle_wait_s = 0.2
    retry_wait_s = 0.005  # while some peer has messages waiting for its connection

    def __init__(
        self, ctx: zmq.Context, sender: str, send_timeout_ms: int = 2000, tap: WireTap | None = None,
        signer=None, queue_max: int = 10_000, on_fail: Callable[[str, str, str, str], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.sender = sender
        self.send_timeout_ms = send_timeout_ms
        self.tap = tap or WireTap(None)
        self.signer = signer
        self.queue_max = queue_max
        self.on_fail = on_fail
        self._inq: queue.SimpleQueue = queue.SimpleQueue()
        self._socks: dict[str, zmq.Socket] = {}
        self._waiting: dict[str, deque[_Pending]] = {}
        self._sizes: dict[str, int] = {}
        self._size_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"outbox-{sender}", daemon=True)
        self._thread.start()

    def send(self, address: str, msg: object, blobs: list[bytes] | None = None) -> Future:
        """Queue one payload message (wrapped in an Envelope) plus optional media blobs.

        Returns:
            A future that resolves to ``None`` once ZeroMQ took the message, or raises
            :class:`PeerUnavailable` (peer not connected within ``send_timeout_ms``, its queue
            full, an invalid address, or the outbox closed). Never raises itself.
        """
        frames = [pack(msg, self.sender), *(blobs or [])]
        self.tap.record(self.sender, frames)
        if self.signer is not None:
            frames = self.signer.sign(frames)
        fut: Future = Future()
        item = _Pending(frames, fut, getattr(msg, "request_id", ""), type(msg).DESCRIPTOR.name,
                        time.monotonic() + self.send_timeout_ms / 1000)
        with self._size_lock:
            size = self._sizes.get(address, 0)
            full = size >= self.queue_max
            if not full:
                self._sizes[address] = size + 1
        if self._closed or full:
            self._fail(address, item, "outbox closed" if self._closed else f"{self.queue_max} messages already queued")
            return fut
        self._inq.put((address, item))
        return fut

    def pending(self, address: str | None = None) -> int:
        """Messages not yet handed to ZeroMQ (for one peer, or all)."""
        with self._size_lock:
            return self._sizes.get(address, 0) if address else sum(self._sizes.values())

    # -- sender thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                first = self._inq.get(timeout=self.retry_wait_s if self._waiting else self.idle_wait_s)
            except queue.Empty:
                first = None
            items = [first] if first is not None else []
            while True:
                try:
                    items.append(self._inq.get_nowait())
                except queue.Empty:
                    break
            stop = False
            for entry in items:
                if entry is _STOP:
                    stop = True
                    continue
                address, item = entry
                self._waiting.setdefault(address, deque()).append(item)
            for address in list(self._waiting):
                self._flush(address)
            if stop:
                self._shutdown()
                return

    def _flush(self, address: str) -> None:
        waiting = self._waiting[address]
        try:
            sock = self._sock(address)
        except zmq.ZMQError as exc:
            self._fail_all(address, f"invalid peer address {address!r}: {exc}")
            return
        while waiting:
            item = waiting[0]
            try:
                sock.send_multipart(item.frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                self._fail_all(address, f"send to {address} failed: {exc}")
                return
            waiting.popleft()
            self._done(address)
            item.future.set_result(None)
        if not waiting:
            del self._waiting[address]
        elif waiting[0].deadline <= time.monotonic():
            # The oldest message waited its whole timeout: the peer is down. Fail everything
            # queued for it and drop the socket (its pending connect belongs to a dead peer).
            self._fail_all(address, f"no connection to {address} within {self.send_timeout_ms} ms")

    def _sock(self, address: str) -> zmq.Socket:
        sock = self._socks.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            try:
                sock.connect(address)
            except zmq.ZMQError:
                sock.close(0)
                raise
            self._socks[address] = sock
        return sock

    def _fail_all(self, address: str, reason: str) -> None:
        sock = self._socks.pop(address, None)
        if sock is not None:
            sock.close(0)
        for item in self._waiting.pop(address, deque()):
            self._done(address)
            self._fail(address, item, reason)

    def _done(self, address: str) -> None:
        with self._size_lock:
            left = self._sizes.get(address, 1) - 1
            if left > 0:
                self._sizes[address] = left
            else:
                self._sizes.pop(address, None)

    def _fail(self, address: str, item: _Pending, reason: str) -> None:
        logger.warning("request %s: %s to %s not delivered: %s", item.request_id, item.field, address, reason)
        item.future.set_exception(PeerUnavailable(reason))
        if self.on_fail is not None:
            try:
                self.on_fail(address, item.request_id, item.field, reason)
            except Exception:
                logger.exception("outbox on_fail callback failed")

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.linger_s
        while self._waiting and time.monotonic() < deadline:
            time.sleep(self.retry_wait_s)
            for address in list(self._waiting):
                self._flush(address)
        for address in list(self._waiting):
            self._fail_all(address, "outbox closed")
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

    linger_s = 1.0  # close(): how long queued messages may still wait for their peers

    def close(self) -> None:
        """Deliver what is queued (up to :attr:`linger_s`), then close every socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._inq.put(_STOP)
        self._thread.join(self.linger_s + 2)


_STOP = object()
