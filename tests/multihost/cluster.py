"""A deployment spread over namespace hosts (:mod:`tests.multihost.netns`): Redis and the gateway
on one host, each stage on a host of its own, every process bound to and advertising its
host's address (never 0.0.0.0), Mooncake over TCP between hosts, the cluster secret on.

``loopback=True`` puts a whole deployment on one host the same way, except that the processes
bind and advertise 127.0.0.1 (so stage-to-stage traffic stays on ``lo``) and only the gateway's
HTTP port and Redis also listen on the host's address, for the client: the baseline that differs
from the spread deployment only in the links between stages."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from epd.launcher import gateway_ready
from tests.multihost.netns import Topology

ROOT = Path(__file__).resolve().parents[2]
REDIS_PORT = 6379
GATEWAY_PORT = 8000


@dataclass
class NsCluster:
    """Processes on namespace hosts; ``url`` is the gateway as the client (root namespace) reaches it."""

    topo: Topology
    tmp: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)  # process name -> host name
    logs: dict[str, Path] = field(default_factory=dict)
    loopback: bool = False
    url: str = ""
    redis_url: str = ""  # as the processes reach Redis
    client_redis_url: str = ""  # as the client (root namespace) reaches it
    stop_s: dict[str, float] = field(default_factory=dict)  # seconds each process took to exit

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def _popen(self, name: str, host: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.logs.setdefault(name, self.tmp / f"{name}.log")
        self.hosts[name] = host
        self.procs[name] = subprocess.Popen([*self.topo.exec_prefix(host), *argv], cwd=ROOT, env=env,
                                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        return self.procs[name]

    def start_redis(self, host: str) -> None:
        from tests.conftest import _redis_server_binary

        password = secrets.token_hex(8)
        addr = self.topo.hosts[host].address
        binds = ["127.0.0.1", addr] if self.loopback else [addr]
        self._popen("redis", host, [_redis_server_binary(), "--port", str(REDIS_PORT), "--bind", *binds,
                                    "--requirepass", password, "--save", "", "--appendonly", "no",
                                    "--dir", str(self.tmp)], dict(os.environ))
        self.redis_url = f"redis://:{password}@{binds[0]}:{REDIS_PORT}/0"
        self.client_redis_url = f"redis://:{password}@{addr}:{REDIS_PORT}/0"
        client = redis.Redis.from_url(self.client_redis_url, socket_connect_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server in {host} did not answer:\n{self.log('redis')[-2000:]}")

    def spawn(self, name: str, host: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``<role>-<i>`` on ``host``: EPD_HOST / EPD_ADVERTISE_HOST are the host's address
        (127.0.0.1 with ``loopback``)."""
        role = name.rsplit("-", 1)[0]
        public = self.topo.hosts[host].address
        addr = "127.0.0.1" if self.loopback else public
        env = {**self.env, "EPD_REDIS_URL": self.redis_url, "EPD_INSTANCE_ID": name, "EPD_HOST": addr}
        if role == "gateway":
            env.update(EPD_GATEWAY_HOST=public, EPD_GATEWAY_PORT=str(GATEWAY_PORT))
            self.url = f"http://{public}:{GATEWAY_PORT}"
        else:
            env["EPD_ADVERTISE_HOST"] = addr
        env.update(extra_env or {})
        return self._popen(name, host, [sys.executable, "-m", f"services.{role}"], env)

    def wait_ready(self, want: dict[str, int], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"processes exited during start-up: {dead}\n" + "\n".join(
                    f"--- {n}\n{self.log(n)[-3000:]}" for n in dead))
            if gateway_ready(self.url, want):
                return
            time.sleep(0.2)
        raise RuntimeError("cluster not healthy in time:\n" + "\n".join(
            f"--- {n}\n{self.log(n)[-2000:]}" for n in self.procs))

    def stop(self, timeout: float = 10) -> dict[str, int]:
        """SIGTERM every process (Redis last), SIGKILL stragglers; returns exit codes."""
        order = [n for n in self.procs if n != "redis"] + (["redis"] if "redis" in self.procs else [])
        codes = {}
        for batch in (order[:-1], order[-1:]) if "redis" in self.procs else (order,):
            t0 = time.monotonic()
            for n in batch:
                if self.procs[n].poll() is None:
                    self.procs[n].send_signal(signal.SIGTERM)
            for n in batch:
                try:
                    codes[n] = self.procs[n].wait(timeout=max(0.1, t0 + timeout - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.procs[n].kill()
                    codes[n] = self.procs[n].wait()
                self.stop_s[n] = round(time.monotonic() - t0, 2)
        return codes


def start_ns_cluster(topo: Topology, tmp: Path, model: Path, placement: dict[str, str],
                     extra_env: dict[str, str] | None = None, timeout: float = 120,
                     loopback: bool = False) -> NsCluster:
    """Redis + every process of ``placement`` (process name ``<role>-<i>`` → host name), ready.

    ``placement`` must put ``redis`` and ``gateway-0`` somewhere; the processes start at once
    and load their models in parallel. On failure everything started is stopped again.
    """
    env = {
        **os.environ, "EPD_MODEL": str(model), "EPD_TRANSFER_BACKEND": "mooncake", "EPD_TORCH_THREADS": "1",
        "EPD_DTYPE": "float32",  # what the tests' HF reference and byte counts assume (not EPD_DTYPE=auto's pick)
        "EPD_CLUSTER_SECRET": secrets.token_hex(16), "EPD_HEARTBEAT_S": "0.5", "EPD_REGISTRY_REFRESH_S": "0.2",
        "EPD_KV_MEMORY_MB": "64", "EPD_FEATURE_POOL_MB": "64", "EPD_PREFILL_BUFFER_MB": "64",
        "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra_env or {}),
    }
    cluster = NsCluster(topo, tmp, env, loopback=loopback)
    try:
        cluster.start_redis(placement["redis"])
        for name, host in placement.items():
            if name != "redis":
                cluster.spawn(name, host)
        want = {}
        for name in placement:
            role = name.rsplit("-", 1)[0]
            if role in ("encoder", "prefill", "decode"):
                want[role] = want.get(role, 0) + 1
        cluster.wait_ready(want, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
