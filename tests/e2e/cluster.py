"""Start a whole deployment on loopback for the e2e tests, the way ``epd up`` does.

:func:`start_cluster` fills a :class:`~epd.config.LauncherConfig`, takes the processes from
:func:`epd.launcher.deployment_specs` (the commands and environment ``epd up`` builds) and runs
them under :class:`epd.supervisor.Supervisor` in a background thread with ``restart="no"``: a
test that kills a process decides itself whether it comes back (:meth:`Cluster.spawn`).
Process names are the launcher's (``encoder-0``, ``prefill-1``, ``decode-0``, ``gateway``);
each process's output goes to ``<tmp>/<name>.log``, the supervisor's own lines to
``<tmp>/supervisor.log``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time
from functools import cached_property
from pathlib import Path

from epd.config import LauncherConfig, load
from epd.launcher import deployment_specs, deployment_topology, gateway_ready
from epd.registry.registry import Registry
from epd.supervisor import ProcessSpec, ProcessStatus, Supervisor

# every process of a test cluster: fast heartbeats and registry refresh, small pools
TEST_ENV = {
    "EPD_HEARTBEAT_S": "0.5", "EPD_REGISTRY_REFRESH_S": "0.2", "EPD_KV_MEMORY_MB": "64",
    "EPD_FEATURE_POOL_MB": "64", "EPD_PREFILL_BUFFER_MB": "64",
}
_ENDED = ("exited", "stopped", "killed", "retired")  # supervisor states of a run that is over


class Proc:
    """One run of a supervised process: the part of :class:`subprocess.Popen` the tests use.

    ``poll``/``wait`` read the supervisor's state, which notes an exit within its poll period
    (50 ms); ``returncode`` is negative for a death by signal, as with ``Popen``.
    """

    def __init__(self, supervisor: Supervisor, name: str, pid: int) -> None:
        self.supervisor, self.name, self.pid = supervisor, name, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            status = _status(self.supervisor, self.name)
            if status.pid == self.pid and status.state in _ENDED:
                self.returncode = status.returncode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit code once the run is over; raises :class:`subprocess.TimeoutExpired` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.name, timeout or 0)
            time.sleep(0.02)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # the supervisor has not reaped it: the pid is still this run's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Cluster:
    """A deployment running under a :class:`Supervisor` in a background thread.

    ``procs[name]`` is the current run of each process, ``logs[name]`` its log file, ``env`` the
    variables every process got on top of the launcher's (``TEST_ENV``, the wire tap, the test's
    own), ``tap`` the wire tap file.
    """

    def __init__(self, specs: list[ProcessSpec], *, url: str, redis_url: str, env: dict[str, str], tmp: Path,
                 stop_timeout_s: float = 3600) -> None:
        self.url, self.redis_url, self.env, self.tmp = url, redis_url, env, tmp
        self.tap = Path(env["EPD_WIRE_TAP"])
        self.specs = {s.name: s for s in specs}
        self.logs = {s.name: Path(s.log_file) for s in specs if s.log_file}
        self._output = open(tmp / "supervisor.log", "a")  # noqa: SIM115 (closed by stop)
        # stop() SIGKILLs after its own timeout; the supervisor's is only a backstop
        self.supervisor = Supervisor(specs, restart="no", stop_timeout_s=stop_timeout_s, output=self._output)
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cluster-supervisor", daemon=True)
        self._thread.start()
        self.procs = {name: self._started(name) for name in self.specs}

    def _run(self) -> None:
        try:
            self.exit_code = self.supervisor.run()
        except Exception as exc:  # noted for start_cluster's error; run() killed every process
            self.error = exc

    def _started(self, name: str, timeout: float = 30) -> Proc:
        """The handle of ``name``'s current run, once the supervisor's loop has started it."""
        deadline = time.monotonic() + timeout
        while (status := _status(self.supervisor, name)).state == "new":
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the supervisor did not start {name} (error: {self.error!r})")
            time.sleep(0.01)
        return Proc(self.supervisor, name, status.pid)

    @cached_property
    def registry(self) -> Registry:
        """The deployment's registry, with the cluster secret when ``EPD_CLUSTER_SECRET`` is set."""
        return Registry(self.redis_url, secret=self.env.get("EPD_CLUSTER_SECRET", "").encode() or None)

    def log(self, name: str) -> str:
        path = self.logs[name]
        return path.read_text(errors="replace") if path.exists() else ""

    def spawn(self, name: str, extra_env: dict[str, str] | None = None) -> Proc:
        """Start process ``name`` again (it must be down: see :meth:`Proc.wait`), with ``extra_env``
        on top of its environment for this run; its log is appended to.

        Raises:
            ValueError: it is still running. RuntimeError: the supervisor is no longer running.
        """
        if not self._thread.is_alive():
            raise RuntimeError("the cluster's supervisor has ended (stopped, or every process exited)")
        spec = self.specs[name]
        if extra_env:
            spec = dataclasses.replace(spec, env={**(spec.env or {}), **extra_env})
        self.procs[name].poll()  # keep the old run's exit code: the supervisor forgets it
        self.supervisor.respawn(name, spec)
        self.procs[name] = self._started(name)
        return self.procs[name]

    def stop(self, timeout: float = 20) -> dict[str, int | None]:
        """SIGTERM every process (they drain); SIGKILL what still runs after ``timeout`` s.
        Returns the last exit code of every process that was started."""
        self.supervisor.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.supervisor.kill()
            self._thread.join()
        self._output.close()
        return {s.name: s.returncode for s in self.supervisor.processes() if s.pid}


def _status(supervisor: Supervisor, name: str) -> ProcessStatus:
    return next(s for s in supervisor.processes() if s.name == name)


def start_cluster(
    tmp: Path, redis_url: str, model: Path, *, encoders: int = 1, prefills: int = 1, decodes: int = 1,
    backend: str = "mooncake", extra_env: dict[str, str] | None = None, timeout: float = 120,
) -> Cluster:
    """Start ``encoders``-``prefills``-``decodes`` instances and a gateway as ``epd up`` would
    (one torch thread each unless ``extra_env`` sets ``EPD_TORCH_THREADS``) and wait until the
    gateway sees them all.

    Raises:
        RuntimeError: a process exited during start-up, or the gateway did not see every
            instance within ``timeout`` s (the message has the logs' tails); the cluster is stopped.
    """
    from tests.conftest import free_port

    port = free_port()
    env = {**TEST_ENV, "EPD_WIRE_TAP": str(tmp / "wire.tap"), **(extra_env or {})}
    cfg = load(LauncherConfig, redis_url=redis_url, model=str(model), gateway_port=port, encoders=encoders,
               prefills=prefills, decodes=decodes, topology="", transfer_backend=backend,
               torch_threads=int(env.get("EPD_TORCH_THREADS", "1")), restart="no")
    specs = deployment_specs(cfg, redis_url, model, port, extra_env=env, log_dir=tmp)
    cluster = Cluster(specs, url=f"http://127.0.0.1:{port}", redis_url=redis_url, env=env, tmp=tmp)
    topo = deployment_topology(cfg)
    want = {role: topo.count(role) for role in ("encoder", "prefill", "decode")}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = {s.name: s.returncode for s in cluster.supervisor.processes() if s.state in _ENDED}
        if dead or cluster.error is not None:
            cluster.stop()
            logs = "\n".join(f"--- {n}\n{cluster.log(n)[-3000:]}" for n in dead)
            raise RuntimeError(f"processes exited during start-up: {dead} (supervisor: {cluster.error!r})\n{logs}")
        if gateway_ready(cluster.url, want):
            return cluster
        time.sleep(0.3)
    cluster.stop()
    raise RuntimeError("cluster not healthy in time:\n" + "\n".join(
        f"--- {n}\n{cluster.log(n)[-2000:]}" for n in cluster.specs))
