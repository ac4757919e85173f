"""Deployment shapes started by ``epd up --topology`` give the greedy tokens of HF ``generate``;
SIGTERM drains an instance without losing its in-flight request.

One module-scoped deployment per topology (this is a 2-core machine): each is the real
launcher (its supervisor) with a real Redis, the tiny model and the Mooncake transfer engine.
Prints one streaming request's TTFT (time to the first SSE chunk) per topology.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from epd.admin import check_health, get_stats
from epd.launcher import gateway_ready
from epd.registry.registry import Registry
from epd.topology import parse_topology
from tests.conftest import free_port
from tests.e2e.cluster import start_cluster
from tests.e2e.http import post, user_message
from tests.model_fixtures import sample_photos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGIES = ["E-P-D", "EP-D", "E-PD", "EPD"]
MAX_NEW = 24
TEXT = "Describe the picture."


@dataclass
class Deployment:
    topology: str
    url: str
    redis_url: str
    proc: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_deployment(tmp: Path, topology: str, redis_url: str, model: Path, timeout: float = 180,
                     extra_env: dict[str, str] | None = None) -> Deployment:
    """``epd up --topology`` as a subprocess; waits until every role of the topology is registered."""
    port = free_port()
    log = tmp / "up.log"
    env = {
        **os.environ, "EPD_TORCH_THREADS": "1", "EPD_HEARTBEAT_S": "0.5", "EPD_REGISTRY_REFRESH_S": "0.2",
        "EPD_KV_MEMORY_MB": "64", "EPD_FEATURE_POOL_MB": "64", "EPD_PREFILL_BUFFER_MB": "64",
        "EPD_WIRE_TAP": str(tmp / "wire.tap"), "PYTHONUNBUFFERED": "1", **(extra_env or {}),
    }
    cmd = [sys.executable, "-m", "epd.cli", "up", "--topology", topology, "--port", str(port),
           "--redis-url", redis_url, "--model", str(model), "--transfer-backend", "mooncake"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    dep = Deployment(topology, f"http://127.0.0.1:{port}", redis_url, proc, log)
    topo = parse_topology(topology)
    want = {r: topo.count(r) for r in ("encoder", "prefill", "decode")}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if gateway_ready(dep.url, want):
            return dep
        time.sleep(0.3)
    dep.stop()
    raise RuntimeError(f"{topology} not up:\n{log.read_text(errors='replace')[-4000:]}")


def stream_ttft(url: str, body: dict) -> tuple[float, list[int], str]:
    """POST a streaming request; returns (seconds to the first SSE chunk, token ids, finish reason)."""
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, ids, finish = None, [], ""
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            if line == "data: [DONE]":
                break
            for choice in json.loads(line[6:])["choices"]:
                ids.extend(choice.get("token_ids", []))
                finish = choice.get("finish_reason") or finish
    return ttft, ids, finish


@pytest.fixture(scope="module")
def photo():
    return sample_photos()["astronaut"]


@pytest.fixture(scope="module")
def reference(hf_reference, photo):
    return hf_reference.greedy([photo], TEXT, MAX_NEW)


@pytest.fixture(scope="module", params=TOPOLOGIES)
def deployment(request, tmp_path_factory, redis_url, tiny_model):
    db = 2 + TOPOLOGIES.index(request.param)  # apart from other modules' clusters
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    dep = start_deployment(tmp_path_factory.mktemp(request.param.replace("-", "_")), request.param, url, tiny_model)
    yield dep
    code = dep.stop()
    assert code == 0, dep.log.read_text(errors="replace")[-3000:]
    assert Registry(url).instances() == []  # every role deregistered on SIGTERM


def test_topology_matches_generate(deployment, reference, photo):
    body = {"messages": user_message([photo], TEXT), "max_tokens": MAX_NEW, "temperature": 0,
            "return_token_ids": True}
    ttft, ids, finish = stream_ttft(deployment.url, body)
    assert ids == reference[1]
    assert finish == ("length" if len(ids) == MAX_NEW else "stop")
    other = {**body, "messages": user_message([sample_photos()["chelsea"]], TEXT)}  # warm, not cached
    warm, _, _ = stream_ttft(deployment.url, other)
    print(f"\n[{deployment.topology}] TTFT (first SSE chunk): first request {ttft * 1e3:.1f} ms, "
          f"second (other image) {warm * 1e3:.1f} ms")


def test_topology_processes_and_admin(deployment):
    """Roles written together share one process; every process answers health and stats."""
    topo = parse_topology(deployment.topology)
    instances = [i for i in Registry(deployment.redis_url).instances() if "gateway" not in i.roles]
    by_pid: dict[int, list[str]] = {}
    for inst in instances:
        by_pid.setdefault(inst.pid, []).extend(inst.roles)
    assert sorted(tuple(sorted(r)) for r in by_pid.values()) == sorted(tuple(sorted(p.roles)) for p in topo.processes)
    for inst in instances:
        assert inst.admin and check_health(inst.admin) == "SERVING"
        assert check_health(inst.admin, inst.roles[0]) == "SERVING"
        stats = get_stats(inst.admin)
        assert stats.pid == inst.pid
        assert {r.instance_id for r in stats.roles} >= {inst.instance_id}
        assert sorted(r.role for r in stats.roles) == sorted(by_pid[inst.pid])
        assert all(r.state == "serving" and r.inflight == 0 for r in stats.roles)


def test_drain_finishes_inflight_and_routes_new_work_elsewhere(tmp_path, redis_url, tiny_model, photo):
    """SIGTERM to the decode serving a long request: it is published as draining at once (still
    alive, so nobody fails its requests, but never chosen), the request still completes, a
    request sent meanwhile goes to the other decode, and the drained one exits 0.

    Runs under tests/e2e/cluster.py (the launcher's processes, ``restart="no"``), not ``epd up``,
    whose supervisor would start the drained process again."""
    url = redis_url.rsplit("/", 1)[0] + "/7"
    cluster = start_cluster(tmp_path, url, tiny_model, decodes=2, extra_env={"EPD_DRAIN_TIMEOUT_S": "120"})
    reg = Registry(url)
    try:
        long_body = {"messages": user_message([photo], TEXT), "max_tokens": 1000, "ignore_eos": True,
                     "temperature": 0, "return_token_ids": True}
        result: dict = {}

        def run_long() -> None:
            result["ttft"], result["ids"], result["finish"] = stream_ttft(cluster.url, long_body)

        worker = threading.Thread(target=run_long)
        worker.start()
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            for inst in reg.instances("decode"):
                if get_stats(inst.admin).roles[0].load.get("running", 0) > 0:
                    victim = inst
            time.sleep(0.05)
        assert victim is not None, "the long request never reached a decode instance"
        [other] = [i for i in reg.instances("decode") if i.instance_id != victim.instance_id]
        cluster.procs[victim.instance_id].send_signal(signal.SIGTERM)
        while not any(i.instance_id == victim.instance_id and i.draining for i in reg.instances("decode")):
            time.sleep(0.02)
        time.sleep(0.6)  # the gateway's registry view refreshes every 0.2 s
        before = cluster.tap.read_text().count(f"{other.instance_id} token_delta")
        status, _, body = post(f"{cluster.url}/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Tell me about the garden."}], "max_tokens": 8,
            "ignore_eos": True, "temperature": 0})
        assert status == 200, body
        # the new request's 7 decode tokens came from the other instance (the 1st is prefill's);
        # the tap line is written just after the send, so it may trail the HTTP response a little
        deadline = time.monotonic() + 5
        while cluster.tap.read_text().count(f"{other.instance_id} token_delta") - before < 7:
            assert time.monotonic() < deadline, "the new request was not decoded by the other instance"
            time.sleep(0.05)
        assert worker.is_alive(), "the long request ended before the drain was exercised"
        worker.join(timeout=240)
        assert len(result["ids"]) == 1000 and result["finish"] == "length"
        assert cluster.procs[victim.instance_id].wait(timeout=30) == 0
        assert f"{victim.instance_id} drained" in cluster.log(victim.instance_id)
    finally:
        cluster.stop()
