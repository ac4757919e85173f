"""Health and admin gRPC service of a backend process (DESIGN.md §9; contract: proto/admin.proto).

Every backend process serves, on ``EPD_ADMIN_PORT`` (0 = any free port, registered as
``InstanceInfo.admin``):

- the standard health service ``grpc.health.v1.Health``: service ``""`` is the whole
  process (SERVING once every hosted role is registered, NOT_SERVING as soon as one drains),
  and one service per hosted role (``"encoder"``, ``"prefill"``, ``"decode"``);
- ``epd.admin.v1.Admin``: ``Stats`` (each role's load + capacity + in-flight count) and
  ``Drain`` (stop taking new work, finish in-flight, deregister, exit) and ``SwitchRole``
  (give up one hosted role for another in place: :meth:`epd.process_host.ProcessHost.switch_role`).

With the cluster secret (EPD_CLUSTER_SECRET / _FILE) the Admin methods want the metadata
``authorization: Bearer <hex of derive_key(secret, "admin")>`` and answer UNAUTHENTICATED
otherwise; the health service stays open, since Kubernetes' native gRPC probes send no metadata
(it tells only whether the process serves). The clients below send the token when given one.

The server runs in gRPC's own threads while each role's loop runs in another: ``Stats``
reads the same :meth:`ServiceProc.load` the heartbeat thread calls (a snapshot of the
loop's containers, never a mutation), and ``Drain`` only sets a flag the loop checks.
Only the messages are generated from the .proto (``make proto``); method handlers are
built here from the service descriptor, so no generated gRPC module has to be importable.
"""

from __future__ import annotations

import hmac
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from epd.config import ConfigError
from epd.wire.gen import admin_pb2 as apb

if TYPE_CHECKING:
    from epd.service import ServiceProc

logger = logging.getLogger(__name__)

SERVICE = apb.DESCRIPTOR.services_by_name["Admin"].full_name  # "epd.admin.v1.Admin"
_TYPES = {"Stats": (apb.StatsRequest, apb.StatsReply), "Drain": (apb.DrainRequest, apb.DrainReply),
          "SwitchRole": (apb.SwitchRoleRequest, apb.SwitchRoleReply)}


class AdminError(RuntimeError):
    """The admin or health service could not be reached or answered with an error."""


def role_stats(proc: ServiceProc) -> apb.RoleStats:
    """One role's stats; ``load()`` races the loop thread, so a failed snapshot is retried once.

    Raises:
        RuntimeError: the snapshot failed twice.
    """
    for attempt in range(2):
        try:
            load, capacity, inflight = proc.load(), proc.capacity(), proc.inflight()
            break
        except RuntimeError:  # e.g. "deque mutated during iteration"
            if attempt:
                raise
    return apb.RoleStats(
        role=proc.role, instance_id=proc.instance_id, state=proc.state, inflight=inflight,
        load={k: float(v) for k, v in load.items()}, capacity={k: int(v) for k, v in capacity.items()},
    )


class AdminServer:
    """gRPC server with the health and admin services for the ``procs`` of one process.

    Args:
        procs: the hosted roles.
        host: bind address (EPD_HOST); port: EPD_ADMIN_PORT (0 = any free port).
        advertise: the host part of :attr:`address` (what peers and ``epd health`` use).
        token: the admin key, :func:`epd.wire.auth.admin_token` of the cluster secret
            (``derive_key(secret, "admin")``); Stats and Drain then need
            ``authorization: Bearer <token.hex()>``. ``None``: open to whoever reaches the port.

    Raises:
        ConfigError: the port cannot be bound (names EPD_ADMIN_PORT).
    """

    def __init__(
        self, procs: list[ServiceProc], host: str, port: int, advertise: str, token: bytes | None = None
    ) -> None:
        self.procs = procs  # the host's list: a role switch replaces its element in place
        self.on_switch = None  # set by the host: (from_role, to_role, timeout_s) -> SwitchRoleReply
        self._expected = _bearer(token) if token else None
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="admin"))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        handlers = {
            "Stats": self._handler(self._stats),
            "Drain": self._handler(self._drain),
            "SwitchRole": self._handler(self._switch_role, "SwitchRole"),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        try:
            bound = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise ConfigError(f"EPD_ADMIN_PORT: cannot bind {host}:{port}: {exc}") from None
        if not bound:
            raise ConfigError(f"EPD_ADMIN_PORT: cannot bind {host}:{port}")
        self.address = f"{advertise}:{bound}"
        self.sync_health()

    def _handler(self, fn, name: str = ""):
        name = name or fn.__name__.strip("_").capitalize()
        req_t, rep_t = _TYPES[name]

        def authorized(request, context):
            if self._expected is not None:
                sent = dict(context.invocation_metadata()).get("authorization", "")
                if not hmac.compare_digest(sent.encode(), self._expected.encode()):
                    logger.warning("admin %s from %s refused: %s", name, context.peer(),
                                   "wrong token" if sent else "no token")
                    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                  f"{name} needs the cluster's admin token: set EPD_CLUSTER_SECRET "
                                  "(or EPD_CLUSTER_SECRET_FILE) to the deployment's secret")
            return fn(request, context)

        return grpc.unary_unary_rpc_method_handler(
            authorized, request_deserializer=req_t.FromString, response_serializer=rep_t.SerializeToString
        )

    def start(self) -> None:
        self.server.start()
        logger.info("admin + health gRPC on %s", self.address)

    def stop(self, grace_s: float = 0.5) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()

    def sync_health(self) -> None:
        """Publish each role's state as health status. Called on every state change, from the
        loop threads too (``HealthServicer.set`` takes its own lock)."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        states = [p.state for p in self.procs]
        for proc in self.procs:
            self.health.set(proc.role, serving if proc.state == "serving" else not_serving)
        self.health.set("", serving if all(s == "serving" for s in states) else not_serving)

    def _select(self, role: str, context) -> list[ServiceProc]:
        procs = [p for p in self.procs if not role or p.role == role]
        if not procs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"role {role!r} not hosted here")
        return procs

    def _stats(self, request: apb.StatsRequest, context) -> apb.StatsReply:
        procs = self._select(request.role, context)
        try:
            return apb.StatsReply(pid=os.getpid(), roles=[role_stats(p) for p in procs])
        except RuntimeError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"stats snapshot failed: {exc}")

    def _drain(self, request: apb.DrainRequest, context) -> apb.DrainReply:
        procs = self._select(request.role, context)
        for proc in procs:
            logger.info("%s: drain requested over admin", proc.instance_id)
            proc.request_drain(request.timeout_s or None)
        return apb.DrainReply(roles=[role_stats(p) for p in procs])

    def _switch_role(self, request: apb.SwitchRoleRequest, context) -> apb.SwitchRoleReply:
        if self.on_switch is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this process cannot switch roles")
        self._select(request.from_role, context)
        return self.on_switch(request.from_role, request.to_role, request.timeout_s or None)


# -- clients (epd health / epd stats / epd drain) -----------------------------------------
def _bearer(token: bytes) -> str:
    return f"Bearer {token.hex()}"


def _call(address: str, method: str, request, timeout_s: float, token: bytes | None):
    req_t, rep_t = _TYPES[method]
    metadata = (("authorization", _bearer(token)),) if token else None
    with grpc.insecure_channel(address) as channel:
        stub = channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=req_t.SerializeToString,
            response_deserializer=rep_t.FromString,
        )
        try:
            return stub(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            raise AdminError(f"{method} on {address}: {exc.code().name}: {exc.details()}") from None


def check_health(address: str, service: str = "", timeout_s: float = 3.0, token: bytes | None = None) -> str:
    """Status of ``service`` ("" = the process) at ``address`` (``host:port``). The health service
    needs no token; one given is sent anyway (harmless; a proxy in front may want it).

    Returns:
        ``"SERVING"``, ``"NOT_SERVING"``, ``"SERVICE_UNKNOWN"`` or ``"UNKNOWN"``.

    Raises:
        AdminError: unreachable within ``timeout_s`` seconds.
    """
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s,
                metadata=(("authorization", _bearer(token)),) if token else None,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise AdminError(f"health of {address}: {exc.code().name}: {exc.details()}") from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def get_stats(address: str, role: str = "", timeout_s: float = 3.0, token: bytes | None = None) -> apb.StatsReply:
    """Stats of every hosted role (or one); ``token``: see :class:`AdminServer`.

    Raises:
        AdminError: unreachable, or refused (``UNAUTHENTICATED`` without the right token).
    """
    return _call(address, "Stats", apb.StatsRequest(role=role), timeout_s, token)


def drain(
    address: str, role: str = "", drain_timeout_s: float = 0.0, timeout_s: float = 3.0, token: bytes | None = None
) -> apb.DrainReply:
    """Ask the process to drain (returns at once); ``token``: see :class:`AdminServer`.

    Raises:
        AdminError: unreachable, or refused (``UNAUTHENTICATED`` without the right token).
    """
    return _call(address, "Drain", apb.DrainRequest(role=role, timeout_s=drain_timeout_s), timeout_s, token)


def switch_role(address: str, from_role: str, to_role: str, drain_timeout_s: float = 0.0,
                timeout_s: float = 120.0, token: bytes | None = None) -> apb.SwitchRoleReply:
    """Ask the process at ``address`` to switch ``from_role`` to ``to_role``; returns when the new
    role serves (``ok``) or the switch was refused (``ok`` false, ``message`` says why).

    Raises:
        AdminError: unreachable, ``from_role`` not hosted there (``NOT_FOUND``), refused
            (``UNAUTHENTICATED``), or no answer within ``timeout_s`` seconds.
    """
    request = apb.SwitchRoleRequest(from_role=from_role, to_role=to_role, timeout_s=drain_timeout_s)
    return _call(address, "SwitchRole", request, timeout_s, token)


def stats_dict(reply: apb.StatsReply | apb.DrainReply) -> dict:
    """JSON-ready form of a reply: ``{"pid": …, "roles": [{"role", "instance_id", "state",
    "inflight", "load": {…}, "capacity": {…}}]}``."""
    out: dict = {"pid": reply.pid} if isinstance(reply, apb.StatsReply) else {}
    out["roles"] = [
        {"role": r.role, "instance_id": r.instance_id, "state": r.state, "inflight": r.inflight,
         "load": dict(sorted(r.load.items())), "capacity": dict(sorted(r.capacity.items()))}
        for r in reply.roles
    ]
    return out
