"""Process shell shared by the backend services (the ``*Proc`` side of vLLM's core/proc split).

Lifecycle of every backend instance (encoder, prefill, decode)::

    config from env ─▶ Redis reachable (retry EPD_REDIS_RETRY_S) ─▶ device + model
      ─▶ inbox bound, transfer region registered ─▶ admin + health gRPC up
      ─▶ registered in Redis (heartbeat) ─▶ loop: recv ▸ dispatch ▸ step ▸ drain check
      ─▶ SIGTERM / admin Drain: deregister (routers stop choosing it), keep serving for
         at least EPD_DRAIN_GRACE_S and until nothing is in flight, or fail what is left
         after EPD_DRAIN_TIMEOUT_S ─▶ close sockets, free the registered memory, exit 0

One process may host several roles (``EPD_ROLES``, DESIGN.md §4): :class:`epd.process_host.ProcessHost`
runs each role's loop in its own thread (own inbox, queue, registry entry: logical
isolation); signals are handled in the main thread, which drains every role. A second
SIGTERM/SIGINT stops at once. The role-specific logic lives in the service's ``core`` (no
sockets); the service's ``proc`` subclasses :class:`ServiceProc` and supplies handlers,
``step`` and ``load``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable

import zmq

from epd import device
from epd.bootstrap import advertised_host, connect_registry, run_main, setup_logging
from epd.config import CommonConfig
from epd.registry.peers import PeerRef, PeerWatch
from epd.registry.registry import Heartbeat, InstanceInfo, RegistryError
from epd.transfer import create_backend
from epd.wire.auth import Signer, check_exposure, load_secret
from epd.wire.codec import Dispatcher, WireError, unpack
from epd.wire.gen import epd_pb2 as pb
from epd.wire.sockets import Inbox, Outbox, WireTap

# setup_logging, run_main, connect_registry and advertised_host moved to epd.bootstrap; still
# importable from here for the services that do.
__all__ = ["INFLIGHT_KEYS", "ServiceProc", "advertised_host", "connect_registry", "run_main", "setup_logging"]

logger = logging.getLogger(__name__)

# load() keys that count work not yet finished (encoder: images; prefill: requests;
# decode: running requests + KV reservations waiting for their prefill).
INFLIGHT_KEYS = ("queued_images", "queued_requests", "running", "reserved")


class ServiceProc:
    """Sockets, registry, transfer engine and the busy loop around a service core.

    Args:
        config: the service's typed config.
        role: ``encoder`` | ``prefill`` | ``decode``.
        region_bytes: size of the transfer-registered region this instance owns.

    Attributes:
        region: the registered :class:`epd.transfer.base.Region`.
        outbox: :class:`Outbox` for messages to peers (never blocks the loop).
        peers: :class:`PeerWatch` fed from the registry every heartbeat period.
        state: ``starting`` | ``serving`` | ``draining`` | ``stopped`` (read by the admin service).
        counters: ``peer_deaths``, ``send_failures``, ``handler_errors``, ``auth_rejected`` (published
            with the load).

    Failure handling (DESIGN.md §9): each proc pins the peers a request depends on
    (:meth:`track`); when one of them is declared gone by the registry watch, or a message of
    the request cannot be delivered, :meth:`drop_request` frees what the request holds here and
    tells the gateway (``RequestFailed`` naming the lost ``peer``), which retries or migrates it.
    An exception in a handler or a step fails the request(s) involved, never the loop.

    Raises:
        ConfigError: Redis unreachable after EPD_REDIS_RETRY_S; a non-loopback EPD_HOST without
            EPD_CLUSTER_SECRET.
    """

    idle_poll_ms = 50

    def __init__(self, config: CommonConfig, role: str, region_bytes: int) -> None:
        self.config = config
        self.role = role
        self.instance_id = config.default_instance_id(role)
        self.incarnation = uuid.uuid4().hex[:16]
        device.set_device(config.device)
        # process-global, shared by co-located roles; services.host already set them before the
        # weights loaded (a no-op then), this covers a Proc built without it (tests)
        device.set_threads(config.torch_threads, config.torch_interop_threads)
        self.secret = secret = load_secret(config.cluster_secret, config.cluster_secret_file)
        self.advertise = advertised_host(config)
        check_exposure(config.host, secret, "EPD_HOST")
        self.signer = Signer(secret)
        self.registry = connect_registry(config.redis_url, config.redis_retry_s, secret)
        self.ctx = zmq.Context.instance()
        self.inbox = Inbox(self.ctx, config.host, config.port)
        if config.host != self.advertise:  # bound on a wildcard: tell peers the reachable address
            self.inbox.address = f"tcp://{self.advertise}:{self.inbox.address.rsplit(':', 1)[1]}"
        self._send_failures: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox = Outbox(
            self.ctx, self.instance_id, send_timeout_ms=int(config.send_timeout_s * 1000),
            tap=WireTap(config.wire_tap), signer=self.signer, queue_max=config.send_queue_max,
            on_fail=lambda *failure: self._send_failures.put(failure),
        )
        self.transfer = create_backend(
            config.transfer_backend, host=self.advertise, timeout_s=config.transfer_timeout_s,
            protocol=config.transfer_protocol,
        )
        self.region = self.transfer.allocate(region_bytes, name_hint=role)  # on EPD_DEVICE (set above)
        self.dispatcher = Dispatcher(self.handlers())
        self.peers = PeerWatch(grace_s=2 * config.heartbeat_s + 0.5)
        self.deps: dict[str, tuple[PeerRef, ...]] = {}  # request id -> peers it depends on
        self.counters = {"peer_deaths": 0, "send_failures": 0, "handler_errors": 0, "auth_rejected": 0}
        self._peers_version = 0
        self._next_sweep = 0.0
        self.state = "starting"
        self.state_listeners: list[Callable[[], None]] = []  # called (loop thread) after each change
        self.heartbeat: Heartbeat | None = None
        self._watcher: threading.Thread | None = None
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

    def has_request(self, request_id: str) -> bool:
        """Whether this instance still holds anything for ``request_id``."""
        return False

    def drop_request(self, request_id: str, code: int, reason: str, peer: str = "") -> None:
        """Free everything ``request_id`` holds here and tell the gateway (:meth:`fail`; ``peer``
        is the instance or address that was lost). A no-op for an unknown id."""

    def on_step_error(self, exc: Exception) -> None:
        """A :meth:`step` raised: fail the requests that step was working on (default: log only)."""

    # -- helpers -----------------------------------------------------------------------
    def send(self, address: str, msg: object, blobs: list[bytes] | None = None) -> None:
        """Queue a message; a failed delivery comes back through :meth:`drop_request`."""
        self.outbox.send(address, msg, blobs)

    def fail(self, reply_to: str, request_id: str, code: int, message: str, peer: str = "") -> None:
        """Log the failure and send ``RequestFailed`` to ``reply_to`` (the gateway, or for a KV
        reservation the prefill), even when ``peer`` — the instance found lost — is that same
        target: a peer that really is gone just does not receive it (the outbox reports it, and
        the request is no longer here), while one only believed gone (a view not yet refreshed
        after its restart, a registry restart that outlasted the grace) would otherwise wait on
        the request until its deadline."""
        logger.warning("request %s failed: %s", request_id, message)
        if reply_to:
            self.send(reply_to, pb.RequestFailed(request_id=request_id, code=code, message=message,
                                                 stage=self.role, peer=peer))

    def track(self, request_id: str, *, ids: tuple[str, ...] = (), inboxes: tuple[str, ...] = (),
              replace: bool = False) -> None:
        """Pin the live incarnations of the instances ``request_id`` depends on (by instance id
        or by ZeroMQ inbox), in addition to those pinned before unless ``replace``; unknown ones
        are not tracked (the send path still catches them)."""
        refs = [self.peers.ref(i) for i in ids if i] + [self.peers.ref_at(a) for a in inboxes if a]
        known = tuple(r for r in refs if r is not None)
        before = () if replace else self.deps.get(request_id, ())
        if known or before:
            self.deps[request_id] = tuple(dict.fromkeys(before + known))
        else:
            self.deps.pop(request_id, None)

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
        """Register in Redis and start the heartbeat and the peer watch; ``admin`` is the
        process's gRPC address."""
        info = InstanceInfo(
            instance_id=self.instance_id,
            roles=[self.role],
            inbox=self.inbox.address,
            transfer_handle=self.region.handle,
            model=str(self.config.model),
            capacity=self.capacity(),
            pid=os.getpid(),
            admin=admin,
            incarnation=self.incarnation,
            restarts=self.config.restarts,
            dtype=self.config.dtype,
        )
        self.heartbeat = Heartbeat(
            self.registry, info, self._published_load, self.config.heartbeat_s, self.config.instance_ttl_s
        )
        self.heartbeat.beat()
        self.heartbeat.start()
        self._refresh_peers()
        self._watcher = threading.Thread(target=self._watch_peers, name=f"peers-{self.role}", daemon=True)
        self._watcher.start()
        self._set_state("serving")
        logger.info("%s ready: inbox %s, transfer %s, admin %s, incarnation %s, dtype %s",
                    self.instance_id, self.inbox.address, self.region.handle, admin or "-", self.incarnation,
                    self.config.dtype)

    def _published_load(self) -> dict[str, float]:
        return {**self.load(), **self.counters}

    def _refresh_peers(self) -> None:
        try:
            self.peers.update(self.registry.instances())
        except RegistryError as exc:  # keep the last view; a Redis outage is not a peer death
            logger.debug("peer watch: %s", exc)

    def _watch_peers(self) -> None:
        while not self._stop_now.wait(self.config.heartbeat_s) and self.state != "stopped":
            self._refresh_peers()

    def run_loop(self) -> None:
        """The busy loop: receive ▸ dispatch ▸ failures ▸ step ▸ drain check; shuts down on exit."""
        busy = False
        try:
            while not self._stop_now.is_set():
                frames = self.inbox.recv(0 if busy else self.idle_poll_ms)
                while frames is not None:
                    self._dispatch(frames)
                    frames = self.inbox.recv(0)
                self._handle_failures()
                try:
                    busy = self.step()
                except Exception as exc:  # fails that step's requests, never the loop
                    logger.exception("%s: step failed", self.instance_id)
                    self.counters["handler_errors"] += 1
                    self.on_step_error(exc)
                    busy = True
                if self._drain_deadline is not None and self._drained():
                    break
        finally:
            self.shutdown()

    def _handle_failures(self) -> None:
        """Undeliverable messages and peers declared gone fail the requests involved."""
        while True:
            try:
                address, request_id, field, reason = self._send_failures.get_nowait()
            except queue.Empty:
                break
            self.counters["send_failures"] += 1
            if self.has_request(request_id):
                ref = self.peers.ref_at(address)
                self._safely(request_id, self.drop_request, request_id, pb.UNAVAILABLE,
                             f"{self.role}: {field} not delivered: {reason}", ref.instance_id if ref else address)
        now = time.monotonic()
        if self.peers.version != self._peers_version:
            self._peers_version = self.peers.version
            for request_id, refs in list(self.deps.items()):
                gone = next((r for r in refs if self.peers.is_gone(r)), None)
                if gone is None:
                    continue
                del self.deps[request_id]
                if self.has_request(request_id):
                    self.counters["peer_deaths"] += 1
                    self._safely(request_id, self.drop_request, request_id, pb.UNAVAILABLE,
                                 f"{self.role}: instance {gone.instance_id} is gone", gone.instance_id)
        if now >= self._next_sweep:  # forget the peers of requests that ended
            self._next_sweep = now + self.config.heartbeat_s
            for request_id in [r for r in self.deps if not self.has_request(r)]:
                del self.deps[request_id]

    def _safely(self, request_id: str, fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception:
            self.counters["handler_errors"] += 1
            logger.exception("request %s: failure handling failed", request_id)

    def _drained(self) -> bool:
        now = time.monotonic()
        if self.state == "serving":
            self._set_state("draining")
            self._drain_started = now
            if self.heartbeat is not None:  # still alive (peers keep its requests), no longer chosen
                self.heartbeat.info.draining = True
                try:
                    self.heartbeat.beat()
                except RegistryError as exc:
                    logger.warning("%s: draining state not published: %s", self.instance_id, exc)
            logger.info("%s draining: %d in flight, no longer chosen", self.instance_id, self.inflight())
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
            frames = self.signer.verify(frames)
        except WireError as exc:
            self.counters["auth_rejected"] += 1
            logger.error("%s: rejected unauthenticated message: %s", self.instance_id, exc)
            return
        try:
            self.dispatcher.dispatch(frames)
        except WireError as exc:
            logger.error("%s: dropped malformed message: %s", self.instance_id, exc)
        except Exception as exc:
            # A handler error fails that message's request, never the instance.
            self.counters["handler_errors"] += 1
            request_id = unpack(frames[0])[0].request_id
            logger.exception("request %s: handler error in %s", request_id, self.instance_id)
            self._safely(request_id, self.drop_request, request_id, pb.INTERNAL,
                         f"{self.role}: internal error: {type(exc).__name__}: {exc}")

    def shutdown(self) -> None:
        """Fail what is left, deregister, close sockets, free the registered memory (idempotent)."""
        if self.state == "stopped":
            return
        self.fail_all("instance shutting down")
        if self.heartbeat is not None:
            self.heartbeat.stop(deregister=True)
        self.outbox.close()  # delivers the RequestFailed messages first (up to its linger)
        self.inbox.close()
        self.transfer.close()
        self._set_state("stopped")
        self._stop_now.set()
        logger.info("%s stopped", self.instance_id)
