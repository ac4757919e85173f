"""Start a whole deployment as real processes on loopback (used by the e2e tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from epd.launcher import gateway_ready

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    url: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    tap: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    tmp: Path | None = None

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def spawn(self, name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start (or start again) process ``name`` (``<role>-<i>``; its log is appended to)."""
        role = name.rsplit("-", 1)[0]
        log = self.logs.setdefault(name, self.tmp / f"{name}.log")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{role}"], cwd=ROOT,
            env={**self.env, "EPD_INSTANCE_ID": name, **(extra_env or {})}, stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
        )
        return self.procs[name]

    def stop(self, timeout: float = 20) -> dict[str, int]:
        """SIGTERM every process; returns exit codes (kills stragglers)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait()
        return codes


def start_cluster(
    tmp: Path, redis_url: str, model: Path, *, encoders: int = 1, prefills: int = 1, decodes: int = 1,
    backend: str = "mooncake", extra_env: dict[str, str] | None = None, timeout: float = 120,
) -> Cluster:
    from tests.conftest import free_port

    port = free_port()
    tap = tmp / "wire.tap"
    env = {
        **os.environ, "EPD_REDIS_URL": redis_url, "EPD_MODEL": str(model), "EPD_TRANSFER_BACKEND": backend,
        "EPD_GATEWAY_PORT": str(port), "EPD_WIRE_TAP": str(tap), "EPD_TORCH_THREADS": "1",
        "EPD_HEARTBEAT_S": "0.5", "EPD_REGISTRY_REFRESH_S": "0.2", "EPD_KV_MEMORY_MB": "64",
        "EPD_FEATURE_POOL_MB": "64", "EPD_PREFILL_BUFFER_MB": "64", "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    cluster = Cluster(url=f"http://127.0.0.1:{port}", tap=tap, env=env, tmp=tmp)
    roles = [("encoder", encoders), ("prefill", prefills), ("decode", decodes), ("gateway", 1)]
    for role, count in roles:
        for i in range(count):
            cluster.spawn(f"{role}-{i}")
    deadline = time.monotonic() + timeout
    want = {"encoder": encoders, "prefill": prefills, "decode": decodes}
    while time.monotonic() < deadline:
        dead = {n: p.returncode for n, p in cluster.procs.items() if p.poll() is not None}
        if dead:
            cluster.stop()
            logs = "\n".join(f"--- {n}\n{cluster.log(n)[-3000:]}" for n in dead)
            raise RuntimeError(f"processes exited during start-up: {dead}\n{logs}")
        if gateway_ready(cluster.url, want):
            return cluster
        time.sleep(0.3)
    cluster.stop()
    raise RuntimeError("cluster not healthy in time:\n" + "\n".join(
        f"--- {n}\n{cluster.log(n)[-2000:]}" for n in cluster.procs))
