"""One backend process with a real Redis: gRPC health + admin (stats, drain), and configuration
errors that end the process with one line naming the variable and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epd.admin import AdminError, check_health, drain, get_stats
from epd.registry.registry import Registry
from epd.wire.auth import admin_token
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EPD_")}
    return {**base, "PYTHONUNBUFFERED": "1", "EPD_TORCH_THREADS": "1", **extra}


@pytest.fixture()
def decode(request, tmp_path, clean_redis, tiny_model):
    """``python -m services.decode`` on a fixed admin port; yields (process, admin address, log).
    Indirect parametrization adds environment variables (``{"EPD_CLUSTER_SECRET": …}``)."""
    port = free_port()
    log = tmp_path / "decode.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.decode"], cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        env=_env(EPD_REDIS_URL=clean_redis, EPD_MODEL=str(tiny_model), EPD_ADMIN_PORT=str(port),
                 EPD_INSTANCE_ID="decode-t", EPD_KV_MEMORY_MB="16", EPD_TRANSFER_BACKEND="shm",
                 EPD_DRAIN_GRACE_S="2", EPD_HEARTBEAT_S="0.5", **getattr(request, "param", {})),
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if check_health(address, timeout_s=1) == "SERVING":
                break
        except AdminError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"decode did not become healthy:\n{log.read_text()[-3000:]}")
    yield proc, address, log
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)


def test_health_stats_and_registry_entry(decode, clean_redis):
    proc, address, _ = decode
    assert check_health(address) == "SERVING"
    assert check_health(address, "decode") == "SERVING"
    assert check_health(address, "encoder") == "SERVICE_UNKNOWN"
    [inst] = Registry(clean_redis).instances("decode")
    assert inst.admin == address and inst.pid == proc.pid
    stats = get_stats(address)
    assert stats.pid == proc.pid
    [role] = stats.roles
    assert (role.role, role.instance_id, role.state, role.inflight) == ("decode", "decode-t", "serving", 0)
    assert role.capacity["kv_blocks"] == role.load["total_blocks"] == role.load["free_blocks"] > 0
    with pytest.raises(AdminError, match="NOT_FOUND"):
        get_stats(address, role="encoder")
    cli = subprocess.run([sys.executable, "-m", "epd.cli", "stats", address], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["roles"][0]["capacity"]["kv_blocks"] == role.capacity["kv_blocks"]
    cli = subprocess.run([sys.executable, "-m", "epd.cli", "health", address], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert (cli.returncode, cli.stdout.strip()) == (0, "SERVING")


def test_drain_over_admin_deregisters_and_exits(decode, clean_redis):
    proc, address, log = decode
    reply = drain(address)
    assert [r.role for r in reply.roles] == ["decode"]
    deadline = time.monotonic() + 5
    while not all(i.draining for i in Registry(clean_redis).instances()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(i.draining for i in Registry(clean_redis).instances())  # published at once: no new work routed here
    assert check_health(address) == "NOT_SERVING"  # still up for EPD_DRAIN_GRACE_S
    assert get_stats(address).roles[0].state == "draining"
    assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "drain requested over admin" in text and "decode-t drained" in text and "decode-t stopped" in text
    assert not any(p.startswith(f"epd-{proc.pid}-") for p in os.listdir("/dev/shm"))  # memory freed


SECRET = "admin-test-cluster-secret-0123456789"


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epd.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=_env(**env), timeout=60)


@pytest.mark.parametrize("decode", [{"EPD_CLUSTER_SECRET": SECRET}], indirect=True)
def test_admin_methods_need_the_token_health_does_not(decode, clean_redis, tmp_path):
    proc, address, log = decode
    token = admin_token(SECRET.encode())
    assert check_health(address) == "SERVING"  # no token: the health service stays open (k8s probes)
    for wrong in (None, admin_token(b"another-cluster-secret-0123")):
        with pytest.raises(AdminError, match="Drain on .*: UNAUTHENTICATED: .*EPD_CLUSTER_SECRET"):
            drain(address, token=wrong)
        with pytest.raises(AdminError, match="UNAUTHENTICATED"):
            get_stats(address, token=wrong)
    cli = _cli("drain", address)  # the CLI without the secret
    assert cli.returncode == 1 and "UNAUTHENTICATED" in cli.stderr, cli.stderr
    time.sleep(1.0)  # two heartbeats: a drain would have deregistered by now
    assert check_health(address) == "SERVING"  # refused drains changed nothing
    assert get_stats(address, token=token).roles[0].state == "serving"
    assert [i.instance_id for i in Registry(clean_redis, secret=SECRET.encode()).instances()] == ["decode-t"]
    assert _cli("health", address).stdout.strip() == "SERVING"

    cli = _cli("stats", address, EPD_CLUSTER_SECRET=SECRET)
    assert cli.returncode == 0 and json.loads(cli.stdout)["roles"][0]["state"] == "serving", cli.stderr
    short = _cli("stats", address, EPD_CLUSTER_SECRET="short")
    assert short.returncode == 2 and "EPD_CLUSTER_SECRET" in short.stderr, short.stderr
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    cli = _cli("drain", address, EPD_CLUSTER_SECRET_FILE=str(secret_file))
    assert cli.returncode == 0, cli.stderr
    assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert text.count("admin Drain from") == 3 and "refused: no token" in text and "refused: wrong token" in text
    assert "drain requested over admin" in text and "decode-t drained" in text


@pytest.mark.parametrize("env, variable", [
    ({"EPD_ROLES": "encoder,vision"}, "EPD_ROLES: .*unknown role 'vision'"),
    ({"EPD_ROLES": "EP", "EPD_PORT": "99999"}, "EPD_PORT"),
    ({"EPD_ROLES": "PD", "EPD_MODEL": "/nonexistent/model"}, "EPD_MODEL: .*not a model directory"),
    ({"EPD_ROLES": "D", "EPD_REDIS_URL": "redis://127.0.0.1:{closed}/0", "EPD_REDIS_RETRY_S": "0.5"},
     "EPD_REDIS_URL: .*unreachable.*EPD_REDIS_RETRY_S"),
    ({}, "EPD_ROLES: no role given"),
])
def test_configuration_errors_exit_2_with_one_line(tiny_model, redis_url, env, variable):
    import re

    env = {k: v.format(closed=free_port()) for k, v in env.items()}
    full = _env(**{"EPD_REDIS_URL": redis_url, "EPD_MODEL": str(tiny_model), **env})
    done = subprocess.run([sys.executable, "-m", "services"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("configuration error")]
    assert re.search(variable, line), done.stderr
    assert "Traceback" not in done.stderr
