"""``epd up`` restarts a crashed process: kill -9 one of two decodes, the others keep running,
the decode comes back under the same instance id with a new pid, requests still succeed, and
Ctrl-C then stops everything with exit 0 and no process left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from epd.launcher import gateway_ready
from epd.registry.registry import Registry
from tests.e2e.http import post
from tests.e2e.test_topologies import start_deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

DRAIN_TIMEOUT_S = 10


def launcher_children(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (from /proc; the services are ``exec``'d, so direct children)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def decode_pid(reg: Registry, instance_id: str) -> int:
    return next((i.pid for i in reg.instances("decode") if i.instance_id == instance_id), 0)


def test_killed_decode_is_restarted_and_ctrl_c_stops_everything(tmp_path, redis_url, tiny_model):
    url = redis_url.rsplit("/", 1)[0] + "/9"  # apart from other modules' deployments
    redis.Redis.from_url(url).flushdb()
    env = {"EPD_INSTANCE_TTL_S": "2", "EPD_RESTART_BACKOFF_S": "0.5", "EPD_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S)}
    dep = start_deployment(tmp_path, "E-P-2D", url, tiny_model, extra_env=env)
    try:
        reg = Registry(url)
        procs = launcher_children(dep.proc.pid)
        assert len(procs) == 5  # encoder, prefill, 2 decodes, gateway
        # the thread split reaches every compute process (start_deployment sets EPD_TORCH_THREADS=1)
        compute = [pid for pid in procs if b"services.gateway" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(compute) == 4
        for pid in compute:
            env_of = environ(pid)
            assert [env_of.get(k) for k in ("EPD_TORCH_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")] == ["1"] * 3
        log = dep.log.read_text(errors="replace")
        assert "→ encoder-0 1, prefill-0 1, decode-0 1, decode-1 1 (EPD_TORCH_THREADS=1 for every process" in log
        assert log.count("torch threads: 1 intra-op, 1 inter-op") == 4, log[-4000:]
        # decode-0: the router breaks ties by instance id, so the requests below land on the restarted one
        victim = decode_pid(reg, "decode-0")
        assert victim in procs

        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while decode_pid(reg, "decode-0") in (0, victim):
            assert time.monotonic() < deadline, dep.log.read_text(errors="replace")[-4000:]
            assert dep.proc.poll() is None, "the launcher exited after one crash"
            time.sleep(0.2)
        reborn = decode_pid(reg, "decode-0")
        assert not alive(victim)
        survivors = procs - {victim}
        assert all(alive(pid) for pid in survivors)  # no exit-all
        assert launcher_children(dep.proc.pid) == survivors | {reborn}
        assert "decode-0 exited with code -9; restarting in 0.5 s (restart 1)" in dep.log.read_text(errors="replace")

        deadline = time.monotonic() + 30
        while not gateway_ready(dep.url, {"encoder": 1, "prefill": 1, "decode": 2}):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for _ in range(3):
            status, _, body = post(f"{dep.url}/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4})
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] is not None

        dep.proc.send_signal(signal.SIGINT)
        code = dep.proc.wait(timeout=DRAIN_TIMEOUT_S + 5 + 10)
        assert code == 0, dep.log.read_text(errors="replace")[-4000:]
        assert not [pid for pid in survivors | {reborn} if alive(pid)]
    finally:
        dep.stop()
