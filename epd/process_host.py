"""One process hosting one or more roles (DESIGN.md §4, §9): a loop thread per
:class:`epd.service.ServiceProc`, the admin/health gRPC server, signals and the parent-death
watch in the main thread, and in-place role switches (EPD paper §3.4)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from epd.service import ServiceProc
from epd.wire.auth import derive_key
from epd.wire.gen import admin_pb2 as apb

# build(role, previous proc) -> (new proc, whether it reused the previous one's weights)
ProcFactory = Callable[[str, ServiceProc], tuple[ServiceProc, bool]]

logger = logging.getLogger(__name__)


class ProcessHost:
    """One process hosting one or more roles: a loop thread per :class:`ServiceProc`, the
    admin/health gRPC server, signals and the parent-death watch in the main thread.

    Args:
        procs: constructed (not yet started) procs; their configs share host and admin port.
        factory: builds the proc of another role for :meth:`switch_role` (None: no switching).

    ``run()`` returns 0 when every role stopped cleanly, 1 when a loop crashed.

    Role switch (:meth:`switch_role`, over admin ``SwitchRole``), one at a time::

        offload: request_drain(timeout) ─▶ deregistered (routers stop choosing it), queued work
                 fails UNAVAILABLE (the gateway retries it on a sibling), in-flight work finishes
                 or, after the timeout, fails UNAVAILABLE (the gateway migrates it) ─▶ loop ends,
                 sockets closed, region freed
        migrate: factory(new role, old proc): the old weights when they cover the new role
                 (prefill ↔ decode: the language model), else a load
        onload:  start() registers the new role ─▶ its loop thread ─▶ serving
    """

    watch_period_s = 0.2

    def __init__(self, procs: list[ServiceProc], factory: ProcFactory | None = None) -> None:
        if not procs:
            raise ValueError("no role to host")
        self.procs = procs
        self.factory = factory
        self.config = procs[0].config
        self.crashed = False
        self._signals = 0
        self._first_signal = 0.0
        self._threads: dict[int, threading.Thread] = {}  # id(proc) -> its loop thread
        self._switch_lock = threading.Lock()
        self._switching = False
        self._admin = None

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

    def _start_loop(self, proc: ServiceProc) -> None:
        t = threading.Thread(target=self._run_proc, args=(proc,), name=f"loop-{proc.role}")
        self._threads[id(proc)] = t
        t.start()

    def switch_role(self, from_role: str, to_role: str, timeout_s: float | None = None) -> apb.SwitchRoleReply:
        """Give up hosted role ``from_role`` for ``to_role`` (class docstring); blocks until the new
        role serves. Called from an admin gRPC thread.

        Returns:
            ``SwitchRoleReply``: ``ok`` with the phase times (seconds) and whether the weights
            were reused; ``ok`` false with the reason when refused (unknown or already hosted
            role, no factory, another switch running, the process stopping) or when the new
            role could not be built (the process then stops: the supervisor restarts it).
        """
        old = next((p for p in self.procs if p.role == from_role), None)
        refused = ("this process cannot switch roles" if self.factory is None or self._admin is None
                   else f"role {from_role!r} not hosted here" if old is None
                   else f"role {to_role!r} is already hosted here" if any(p.role == to_role for p in self.procs)
                   else f"unknown role {to_role!r}" if to_role not in ("encoder", "prefill", "decode")
                   else "the process is stopping" if self._signals or self.crashed else "")
        if refused or not self._switch_lock.acquire(blocking=False):
            return apb.SwitchRoleReply(ok=False, message=refused or "another role switch is in progress")
        self._switching = True
        try:
            logger.info("%s: switching %s -> %s: offload", old.instance_id, from_role, to_role)
            t0 = time.monotonic()
            old.request_drain(timeout_s)
            self._threads[id(old)].join()
            t1 = time.monotonic()
            if self._signals or self.crashed:
                return apb.SwitchRoleReply(ok=False, message="the process is stopping", offload_s=t1 - t0)
            try:
                new, reused = self.factory(to_role, old)
            except Exception as exc:  # weights missing, no memory for the region, ...
                logger.exception("%s: cannot build role %s; stopping the process", old.instance_id, to_role)
                self.crashed = True
                for p in self.procs:
                    p.request_stop()
                return apb.SwitchRoleReply(ok=False, message=f"building {to_role} failed: {exc}", offload_s=t1 - t0)
            t2 = time.monotonic()
            new.state_listeners.append(self._admin.sync_health)
            self.procs[self.procs.index(old)] = new
            new.start(admin=self._admin.address)
            self._start_loop(new)
            if self._signals:  # a stop arrived while the new role was being built
                new.request_drain()
            self._admin.sync_health()
            t3 = time.monotonic()
            logger.info("%s: switched %s -> %s as %s in %.3f s (offload %.3f, migrate %.3f%s, onload %.3f)",
                        old.instance_id, from_role, to_role, new.instance_id, t3 - t0, t1 - t0, t2 - t1,
                        " weights reused" if reused else " weights loaded", t3 - t2)
            from epd.admin import role_stats

            return apb.SwitchRoleReply(ok=True, instance_id=new.instance_id, offload_s=t1 - t0, migrate_s=t2 - t1,
                                       onload_s=t3 - t2, weights_reused=reused,
                                       roles=[role_stats(p) for p in self.procs])
        finally:
            self._switching = False
            self._switch_lock.release()

    def run(self) -> int:
        from epd.admin import AdminServer  # grpc only where a process is actually hosted

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        admin = None
        try:
            secret = self.procs[0].secret
            admin = AdminServer(self.procs, self.config.host, self.config.admin_port, self.procs[0].advertise,
                                token=derive_key(secret, "admin") if secret else None)
            admin.on_switch = self.switch_role
            self._admin = admin
            admin.start()
            for proc in self.procs:
                proc.state_listeners.append(admin.sync_health)
            for proc in self.procs:
                proc.start(admin=admin.address)
            admin.sync_health()
            for proc in self.procs:
                self._start_loop(proc)
            parent = os.getppid()
            while self._switching or any(t.is_alive() for t in list(self._threads.values())):
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
            for t in list(self._threads.values()):
                t.join()
            for p in self.procs:
                p.shutdown()  # no-op when the loop already shut it down
            if admin is not None:
                admin.stop()
        return 1 if self.crashed else 0
