"""Process shell shared by the backend services (the ``*Proc`` side of vLLM's core/proc split).

Lifecycle of every backend instance (encoder, prefill, decode)::

    config from env ─▶ Redis reachable (retry EPD_REDIS_RETRY_S) ─▶ device + model
      ─▶ inbox bound, transfer region registered ─▶ admin + health gRPC up
      ─▶ registered in Redis (heartbeat) ─▶ loop: recv ▸ dispatch ▸ step ▸ drain check
      ─▶ SIGTERM / admin Drain: deregister (routers stop choosing it), keep serving for
         at least EPD_DRAIN_GRACE_S and until nothing is in flight, or fail what is left
         after EPD_DRAIN_TIMEOUT_S ─▶ close sockets, free the registered memory, exit 0

One process may host several roles (``EPD_ROLES``, DESIGN.md §4): :class:`ProcessHost`
runs each role's loop in its own thread (own inbox, queue, registry entry: logical
isolation); signals are handled in the main thread, which drains every role. A second
SIGTERM/SIGINT stops at once. The role-specific logic lives in the service's ``core`` (no
sockets); the service's ``proc`` subclasses :class:`ServiceProc` and supplies handlers,
``step`` and ``load``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
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

# load() keys that count work not yet finished (encoder: images; prefill: requests;
# decode: running requests + KV reservations waiting for their prefill).
INFLIGHT_KEYS = ("queued_images", "queued_requests", "running", "reserved")


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_main(main: Callable[[], int | None]) -> None:
    """Run a service entry point: configuration errors become one line on stderr and exit 2;
    otherwise exit with ``main``'s return value (0 when None)."""
    try:
        code = main()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RegistryError as exc:
        print(f"configuration error: EPD_REDIS_URL: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def connect_registry(url: str, retry_s: float) -> Registry:
    """A :class:`Registry` whose Redis answered a ping, retrying for up to ``retry_s`` seconds.

    Raises:
        ConfigError: still unreachable after ``retry_s`` (names EPD_REDIS_URL and EPD_REDIS_RETRY_S).
    """
    registry = Registry(url)
    deadline = time.monotonic() + retry_s
    while True:
        try:
            registry.ping()
            return registry
        except RegistryError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"EPD_REDIS_URL: {exc} (gave up after {retry_s:g} s, EPD_REDIS_RETRY_S)"
                ) from None
            logger.warning("Redis at %s not reachable yet; retrying", url)
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())) or 0.05)


def advertised_host(config: CommonConfig) -> str:
    """The address peers use: EPD_ADVERTISE_HOST, else EPD_HOST, else (EPD_HOST a wildcard such
    as 0.0.0.0 in a container) this host's address from its hostname."""
    if config.advertise_host:
        return config.advertise_host
    if config.host not in ("0.0.0.0", "::", "*", ""):
        return config.host
    return socket.gethostbyname(socket.gethostname())


class ServiceProc:
    """Sockets, registry, transfer engine and the busy loop around a service core.

    Args:
        config: the service's typed config.
        role: ``encoder`` | ``prefill`` | ``decode``.
        region_bytes: size of the transfer-registered region this instance owns.

    Attributes:
        region: the registered :class:`epd.transfer.base.Region`.
        outbox: :class:`Outbox` for messages to peers.
        state: ``starting`` | ``serving`` | ``draining`` | ``stopped`` (read by the admin service).

    Raises:
        ConfigError: Redis unreachable after EPD_REDIS_RETRY_S.
    """

    idle_poll_ms = 50

    def __init__(self, config: CommonConfig, role: str, region_bytes: int) -> None:
        self.config = config
        self.role = role
        self.instance_id = config.default_instance_id(role)
        device.set_device(config.device)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)  # process-global: shared by co-located roles
        self.registry = connect_registry(config.redis_url, config.redis_retry_s)
        self.advertise = advertised_host(config)
        self.ctx = zmq.Context.instance()
        self.inbox = Inbox(self.ctx, config.host, config.port)
        if config.host != self.advertise:  # bound on a wildcard: tell peers the reachable address
            self.inbox.address = f"tcp://{self.advertise}:{self.inbox.address.rsplit(':', 1)[1]}"
        self.outbox = Outbox(self.ctx, self.instance_id, tap=WireTap(config.wire_tap))
        self.transfer = create_backend(
            config.transfer_backend, host=self.advertise, timeout_s=config.transfer_timeout_s
        )
        self.region = self.transfer.allocate(region_bytes, name_hint=role)
        self.dispatcher = Dispatcher(self.handlers())
        self.state = "starting"
        self.state_listeners: list[Callable[[], None]] = []  # called (loop thread) after each change
        self.heartbeat: Heartbeat | None = None
        self._lock = threading.Lock()
        self._stop_now = threading.Event()
        self._drain_deadline: float | None = None  # monotonic; set by request_drain
        self._drain_started = 0.0

    # -- to override -------------------------------------------------------------------
    def handlers(self) -> dict[str, Callable]:
        raise NotImplementedError

    def step(self) -> bool:
        """Do one unit of work; return True if there may be more to do right away."""
        return False

    def load(self) -> dict[str, float]:
        """Current load (called from the heartbeat and admin threads too: must not mutate)."""
        return {}

    def capacity(self) -> dict[str, int]:
        return {}

    def inflight(self) -> int:
        """Work accepted and not finished; the drain waits for 0. Default: the
        :data:`INFLIGHT_KEYS` of :meth:`load` summed."""
        load = self.load()
        return int(sum(load.get(k, 0) for k in INFLIGHT_KEYS))

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

    # -- control (any thread) ----------------------------------------------------------
    def request_drain(self, timeout_s: float | None = None) -> None:
        """Start draining (idempotent): the loop deregisters at its next turn, finishes what
        is in flight within ``timeout_s`` (default EPD_DRAIN_TIMEOUT_S), then stops."""
        with self._lock:
            if self._drain_deadline is None and not self._stop_now.is_set():
                self._drain_deadline = time.monotonic() + (timeout_s or self.config.drain_timeout_s)

    def request_stop(self) -> None:
        """Stop at the loop's next turn, failing whatever is in flight."""
        self._stop_now.set()

    # -- lifecycle (loop thread) -------------------------------------------------------
    def start(self, admin: str = "") -> None:
        """Register in Redis and start the heartbeat; ``admin`` is the process's gRPC address."""
        info = InstanceInfo(
            instance_id=self.instance_id,
            roles=[self.role],
            inbox=self.inbox.address,
            transfer_handle=self.region.handle,
            model=str(self.config.model),
            capacity=self.capacity(),
            pid=os.getpid(),
            admin=admin,
        )
        self.heartbeat = Heartbeat(
            self.registry, info, self.load, self.config.heartbeat_s, self.config.instance_ttl_s
        )
        self.heartbeat.beat()
        self.heartbeat.start()
        self._set_state("serving")
        logger.info("%s ready: inbox %s, transfer %s, admin %s",
                    self.instance_id, self.inbox.address, self.region.handle, admin or "-")

    def run_loop(self) -> None:
        """The busy loop: receive ▸ dispatch ▸ step ▸ drain check; shuts down on exit."""
        busy = False
        try:
            while not self._stop_now.is_set():
                frames = self.inbox.recv(0 if busy else self.idle_poll_ms)
                while frames is not None:
                    self._dispatch(frames)
                    frames = self.inbox.recv(0)
                busy = self.step()
                if self._drain_deadline is not None and self._drained():
                    break
        finally:
            self.shutdown()

    def _drained(self) -> bool:
        now = time.monotonic()
        if self.state == "serving":
            self._set_state("draining")
            self._drain_started = now
            if self.heartbeat is not None:
                self.heartbeat.stop(deregister=True)  # routers stop choosing this instance
            logger.info("%s draining: %d in flight, deregistered", self.instance_id, self.inflight())
        pending = self.inflight()
        if pending == 0 and now - self._drain_started >= self.config.drain_grace_s:
            logger.info("%s drained in %.2f s", self.instance_id, now - self._drain_started)
            return True
        if now >= self._drain_deadline:
            self.fail_all(
                f"instance shut down: request not finished within EPD_DRAIN_TIMEOUT_S={self.config.drain_timeout_s:g} s"
            )
            logger.warning("%s drain timeout: failed %d in-flight", self.instance_id, pending)
            return True
        return False

    def _set_state(self, state: str) -> None:
        self.state = state
        for listener in self.state_listeners:
            listener()

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
        """Deregister, fail what is left, close sockets, free the registered memory (idempotent)."""
        if self.state == "stopped":
            return
        if self.heartbeat is not None:
            self.heartbeat.stop(deregister=True)
        self.fail_all("instance shutting down")
        time.sleep(0.05)
        self.outbox.close()
        self.inbox.close()
        self.transfer.close()
        self._set_state("stopped")
        logger.info("%s stopped", self.instance_id)

    def serve(self) -> int:
        """Run this one role as a whole process (admin server, signals); returns the exit code."""
        return ProcessHost([self]).run()


class ProcessHost:
    """One process hosting one or more roles: a loop thread per :class:`ServiceProc`, the
    admin/health gRPC server, signals and the parent-death watch in the main thread.

    Args:
        procs: constructed (not yet started) procs; their configs share host and admin port.

    ``run()`` returns 0 when every role stopped cleanly, 1 when a loop crashed.
    """

    watch_period_s = 0.2

    def __init__(self, procs: list[ServiceProc]) -> None:
        if not procs:
            raise ValueError("no role to host")
        self.procs = procs
        self.config = procs[0].config
        self.crashed = False
        self._signals = 0
        self._first_signal = 0.0

    def _on_signal(self, signum, _frame) -> None:
        now = time.monotonic()
        if self._signals and now - self._first_signal < 1.0:
            return  # the same stop delivered twice (e.g. to the process and its group)
        self._signals += 1
        if self._signals == 1:
            self._first_signal = now
            logger.info("signal %d: draining %s (EPD_DRAIN_TIMEOUT_S=%g)", signum,
                        ", ".join(p.instance_id for p in self.procs), self.config.drain_timeout_s)
            for p in self.procs:
                p.request_drain()
        else:
            logger.warning("signal %d again: stopping now", signum)
            for p in self.procs:
                p.request_stop()

    def _run_proc(self, proc: ServiceProc) -> None:
        try:
            proc.run_loop()
        except Exception:
            logger.exception("%s: loop crashed; stopping the process", proc.instance_id)
            self.crashed = True
            for p in self.procs:
                p.request_stop()

    def run(self) -> int:
        from epd.admin import AdminServer  # grpc only where a process is actually hosted

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        admin = None
        threads: list[threading.Thread] = []
        try:
            admin = AdminServer(self.procs, self.config.host, self.config.admin_port, self.procs[0].advertise)
            admin.start()
            for proc in self.procs:
                proc.state_listeners.append(admin.sync_health)
            for proc in self.procs:
                proc.start(admin=admin.address)
            admin.sync_health()
            for proc in self.procs:
                t = threading.Thread(target=self._run_proc, args=(proc,), name=f"loop-{proc.role}")
                t.start()
                threads.append(t)
            parent = os.getppid()
            while any(t.is_alive() for t in threads):
                time.sleep(self.watch_period_s)
                if parent != 1 and os.getppid() != parent and self._signals == 0:
                    # launcher died: do not linger holding memory
                    logger.error("parent process exited; draining")
                    self._signals, self._first_signal = 1, time.monotonic()
                    for p in self.procs:
                        p.request_drain()
        finally:
            for p in self.procs:
                p.request_stop()
            for t in threads:
                t.join()
            for p in self.procs:
                p.shutdown()  # no-op when the loop already shut it down
            if admin is not None:
                admin.stop()
        return 1 if self.crashed else 0
