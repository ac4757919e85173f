"""The gateway's side of the wire: one inbox for TokenDelta / RequestFailed, an outbox to
the stages, and one asyncio queue per in-flight request.

ZeroMQ sockets are not thread-safe: the inbox is read by one asyncio task
(``zmq.asyncio``); every send goes through a single-thread executor that owns the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import zmq
import zmq.asyncio

from epd.wire.codec import WireError, unpack
from epd.wire.sockets import Outbox, WireTap, bind_pull

logger = logging.getLogger(__name__)


class EngineClient:
    """Async client of the E/P/D stages.

    Args:
        host, port: where the gateway's inbox binds (0 = any free port).
        instance_id: stamped on sent envelopes.
        tap: optional wire tap (tests).
    """

    def __init__(self, host: str, port: int, instance_id: str, tap: WireTap | None = None) -> None:
        self.actx = zmq.asyncio.Context()
        self.sock = self.actx.socket(zmq.PULL)
        self.address = bind_pull(self.sock, host, port)
        self._send_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-send")
        self.outbox = Outbox(zmq.Context.instance(), instance_id, tap=tap)
        self.streams: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            received_at = time.perf_counter()
            try:
                env, field, payload = unpack(frames[0])
            except WireError as exc:
                logger.error("dropped malformed message: %s", exc)
                continue
            queue = self.streams.get(env.request_id)
            if queue is None:
                logger.debug("request %s: %s for a finished request dropped", env.request_id, field)
                continue
            queue.put_nowait((field, payload, received_at))

    def open(self, request_id: str) -> asyncio.Queue:
        """Register a request; its TokenDelta / RequestFailed messages land in the returned queue
        as ``(payload field, message, time.perf_counter() at receipt)``."""
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = queue
        return queue

    def close_stream(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    async def send(self, address: str, msg: object, blobs: list[bytes] | None = None) -> None:
        """Send one message. Raises ``epd.wire.sockets.PeerUnavailable``."""
        await asyncio.get_running_loop().run_in_executor(self._send_pool, self.outbox.send, address, msg, blobs)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await asyncio.get_running_loop().run_in_executor(self._send_pool, self.outbox.close)
        self._send_pool.shutdown(wait=False)
        self.sock.close(0)
        self.actx.term()
