"""The gateway's side of the wire: one inbox for TokenDelta / RequestFailed, an outbox to
the stages, and one asyncio queue per in-flight attempt.

ZeroMQ sockets are not thread-safe: the inbox is read by one asyncio task (``zmq.asyncio``);
the outbox's own sender thread owns the PUSH sockets, so a send never blocks the event loop
and a dead stage delays only the messages addressed to it.

Every received message is authenticated first (``Signer.verify``, when the cluster secret is
set) and then accepted only from the instances the attempt was sent to: token deltas from its
prefill or decode, failures from any stage of its plan. A forged or stray message never
reaches a stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import zmq
import zmq.asyncio

from epd.wire.codec import WireError, unpack
from epd.wire.sockets import Outbox, WireTap, bind_pull

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    queue: asyncio.Queue
    token_senders: frozenset[str] = frozenset()
    fail_senders: frozenset[str] = frozenset()


class EngineClient:
    """Async client of the E/P/D stages.

    Args:
        host, port: where the gateway's inbox binds (0 = any free port).
        instance_id: stamped on sent envelopes.
        tap: optional wire tap (tests).
        signer: ``epd.wire.auth.Signer`` (MAC on sent messages, checked on received ones).
        send_timeout_s, queue_max: the outbox's per-peer limits.

    Attributes:
        on_rejected: called once per message dropped by authentication or sender checks (metrics).
    """

    def __init__(self, host: str, port: int, instance_id: str, tap: WireTap | None = None, signer=None,
                 send_timeout_s: float = 2.0, queue_max: int = 10_000) -> None:
        self.actx = zmq.asyncio.Context()
        self.sock = self.actx.socket(zmq.PULL)
        self.address = bind_pull(self.sock, host, port)
        self.signer = signer
        self.outbox = Outbox(zmq.Context.instance(), instance_id, send_timeout_ms=int(send_timeout_s * 1000),
                             tap=tap, signer=signer, queue_max=queue_max)
        self.streams: dict[str, _Stream] = {}
        self.on_rejected = lambda: None
        self.on_accepted = None  # optional (request id, payload field, sender) hook, on the event loop
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            received_at = time.perf_counter()
            try:
                if self.signer is not None:
                    frames = self.signer.verify(frames)
                env, field_name, payload = unpack(frames[0])
            except WireError as exc:
                self.on_rejected()
                logger.error("dropped unauthenticated or malformed message: %s", exc)
                continue
            stream = self.streams.get(env.request_id)
            if stream is None:
                logger.debug("request %s: %s for a finished request dropped", env.request_id, field_name)
                continue
            allowed = stream.token_senders if field_name == "token_delta" else stream.fail_senders
            if field_name not in ("token_delta", "request_failed") or env.sender not in allowed:
                self.on_rejected()
                logger.warning("request %s: %s from %s rejected (not a stage of this request)",
                               env.request_id, field_name, env.sender)
                continue
            stream.queue.put_nowait((field_name, payload, received_at, env.sender))
            if self.on_accepted is not None:
                self.on_accepted(env.request_id, field_name, env.sender)

    def open(self, request_id: str, token_senders: set[str], fail_senders: set[str]) -> asyncio.Queue:
        """Register an attempt before anything is sent for it; its accepted TokenDelta /
        RequestFailed messages land in the returned queue as ``(payload field, message,
        time.perf_counter() at receipt, sender)``.

        Args:
            token_senders: instance ids allowed to send token deltas (its prefill and decode).
            fail_senders: instance ids allowed to fail it (every stage of its plan).
        """
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = _Stream(queue, frozenset(token_senders), frozenset(fail_senders))
        return queue

    def close_stream(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    async def send(self, address: str, msg: object, blobs: list[bytes] | None = None) -> None:
        """Send one message and wait until ZeroMQ took it.

        Raises:
            epd.wire.sockets.PeerUnavailable: not delivered within the send timeout.
        """
        await asyncio.wrap_future(self.outbox.send(address, msg, blobs))

    def send_nowait(self, address: str, msg: object) -> None:
        """Queue a message whose delivery nobody waits for (aborts); failures are logged."""
        self.outbox.send(address, msg)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.outbox.close)
        self.sock.close(0)
        self.actx.term()
