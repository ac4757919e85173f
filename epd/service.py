"""Process shell shared by the backend services (the ``*Proc`` side of vLLM's core/proc split).

Lifecycle of every backend instance (encoder, prefill, decode)::

    config from env ─▶ device + model ─▶ inbox bound, transfer region registered
      ─▶ registered in Redis (heartbeat) ─▶ loop: recv ▸ dispatch ▸ step
      ─▶ SIGTERM/SIGINT: stop intake, fail what is in flight, deregister, free memory

The role-specific logic lives in the service's ``core`` (no sockets); the service's
``proc`` subclasses :class:`ServiceProc` and supplies handlers, ``step`` and ``load``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import torch
import zmq

from epd import device
from epd.config import CommonConfig, ConfigError
from epd.registry.registry import Heartbeat, InstanceInfo, Registry, RegistryError
from epd.transfer import create_backend
from epd.wire.codec import Dispatcher, WireError
from epd.wire.gen import epd_pb2 as pb
from epd.wire.sockets import Inbox, Outbox, PeerUnavailable, WireTap

logger = logging.getLogger(__name__)


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_main(main: Callable[[], None]) -> None:
    """Run a service entry point: configuration errors become one line on stderr and exit 2."""
    try:
        main()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RegistryError as exc:
        print(f"registry error: {exc} (check EPD_REDIS_URL)", file=sys.stderr)
        sys.exit(2)


class ServiceProc:
    """Sockets, registry, transfer engine and the busy loop around a service core.

    Args:
        config: the service's typed config.
        role: ``encoder`` | ``prefill`` | ``decode``.
        region_bytes: size of the transfer-registered region this instance owns.

    Attributes:
        region: the registered :class:`epd.transfer.base.Region`.
        outbox: :class:`Outbox` for messages to peers.
    """

    idle_poll_ms = 50

    def __init__(self, config: CommonConfig, role: str, region_bytes: int) -> None:
        self.config = config
        self.role = role
        self.instance_id = config.default_instance_id(role)
        device.set_device(config.device)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.ctx = zmq.Context.instance()
        self.inbox = Inbox(self.ctx, config.host, config.port)
        self.outbox = Outbox(self.ctx, self.instance_id, tap=WireTap(config.wire_tap))
        self.transfer = create_backend(
            config.transfer_backend, host=config.host, timeout_s=config.transfer_timeout_s
        )
        self.region = self.transfer.allocate(region_bytes, name_hint=role)
        self.registry = Registry(config.redis_url)
        self.registry.ping()
        self._stopping = False
        self.dispatcher = Dispatcher(self.handlers())

    # -- to override -------------------------------------------------------------------
    def handlers(self) -> dict[str, Callable]:
        raise NotImplementedError

    def step(self) -> bool:
        """Do one unit of work; return True if there may be more to do right away."""
        return False

    def load(self) -> dict[str, float]:
        return {}

    def capacity(self) -> dict[str, int]:
        return {}

    def fail_all(self, reason: str) -> None:
        """Fail every request in flight (called on shutdown)."""

    # -- helpers -----------------------------------------------------------------------
    def send(self, address: str, msg: object, blobs: list[bytes] | None = None) -> bool:
        """Send, logging (not raising) when the peer is gone. Returns False on failure."""
        try:
            self.outbox.send(address, msg, blobs)
            return True
        except PeerUnavailable as exc:
            logger.warning("request %s: %s", getattr(msg, "request_id", "?"), exc)
            return False

    def fail(self, reply_to: str, request_id: str, code: int, message: str) -> None:
        logger.warning("request %s failed: %s", request_id, message)
        self.send(
            reply_to, pb.RequestFailed(request_id=request_id, code=code, message=message, stage=self.role)
        )

    # -- loop --------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        logger.info("%s: signal %d, shutting down", self.instance_id, signum)
        self._stopping = True

    def serve(self) -> None:
        """Register, run the loop until SIGTERM/SIGINT, then shut down cleanly."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        info = InstanceInfo(
            instance_id=self.instance_id,
            roles=[self.role],
            inbox=self.inbox.address,
            transfer_handle=self.region.handle,
            model=str(self.config.model),
            capacity=self.capacity(),
            pid=os.getpid(),
        )
        self.heartbeat = Heartbeat(
            self.registry, info, self.load, self.config.heartbeat_s, self.config.instance_ttl_s
        )
        self.heartbeat.beat()
        self.heartbeat.start()
        logger.info("%s ready: inbox %s, transfer %s", self.instance_id, self.inbox.address, self.region.handle)
        parent = os.getppid()
        busy = False
        while not self._stopping:
            frames = self.inbox.recv(0 if busy else self.idle_poll_ms)
            while frames is not None:
                self._dispatch(frames)
                frames = self.inbox.recv(0)
            busy = self.step()
            if os.getppid() != parent:  # launcher died: do not linger holding memory
                logger.error("%s: parent process exited, shutting down", self.instance_id)
                break
        self.shutdown()

    def _dispatch(self, frames: list[bytes]) -> None:
        try:
            self.dispatcher.dispatch(frames)
        except WireError as exc:
            logger.error("%s: dropped malformed message: %s", self.instance_id, exc)
        except Exception:
            # A handler bug must not take the instance down; the request times out upstream
            # or was already failed by the handler.
            logger.exception("%s: handler error", self.instance_id)

    def shutdown(self) -> None:
        self.heartbeat.stop(deregister=True)
        self.fail_all("instance shutting down")
        time.sleep(0.05)
        self.outbox.close()
        self.inbox.close()
        self.transfer.close()
        logger.info("%s stopped", self.instance_id)
