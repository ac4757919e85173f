"""One process hosting one or more roles (DESIGN.md §4, §9): a loop thread per
:class:`epd.service.ServiceProc`, the admin/health gRPC server, signals and the parent-death
watch in the main thread."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from epd.service import ServiceProc
from epd.wire.auth import derive_key

logger = logging.getLogger(__name__)


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
            secret = self.procs[0].secret
            admin = AdminServer(self.procs, self.config.host, self.config.admin_port, self.procs[0].advertise,
                                token=derive_key(secret, "admin") if secret else None)
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
