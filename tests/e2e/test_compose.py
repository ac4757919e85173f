"""compose/: the Dockerfile and docker-compose.yml agree with the code, and the compose services
run as local processes (no Docker engine here) and serve a real image request.

The local run reads compose/docker-compose.yml, interpolates ``${VAR:-default}`` the way
``docker compose`` does (with ``EPD_ENCODERS=2`` in the environment, so two encoder replicas),
maps service host names to loopback (``redis://redis:6379`` → the test's Redis, ``/models`` →
the tiny model, fixed container ports → free ones, since replicas share this host), starts
every replica's command with its environment and sends a two-image request (one image per
encoder: intra-request parallelism) that must equal HF ``generate``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from epd import config
from epd.registry.registry import Registry
from tests.conftest import free_port
from tests.e2e.http import post, user_message
from tests.model_fixtures import sample_photos

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"
DOCKERFILE = ROOT / "compose" / "Dockerfile"
ENV_EXAMPLE = ROOT / "compose" / ".env.example"
BACKENDS = {"encoder": config.EncoderConfig, "prefill": config.PrefillConfig, "decode": config.DecodeConfig}
CONFIGS = [*BACKENDS.values(), config.GatewayConfig, config.LauncherConfig]
KNOWN = {f"EPD_{name.upper()}" for cls in CONFIGS for name in cls.model_fields}


def interpolate(value: typing.Any, env: dict[str, str]) -> typing.Any:
    """``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$`` → ``$``, as docker compose does
    (recursively). Raises ValueError for an unset ``${VAR:?error}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if op == ":?" and not env.get(name):
            raise ValueError(f"{name}: {arg}")
        return env.get(name) or (arg if op == ":-" else "")

    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value)


def compose_doc() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def required_vars(cls) -> set[str]:
    return {f"EPD_{n.upper()}" for n, f in cls.model_fields.items() if f.is_required()}


def test_compose_and_dockerfile_consistent_with_config():
    doc = compose_doc()
    text = COMPOSE.read_text() + DOCKERFILE.read_text() + ENV_EXAMPLE.read_text()
    used = set(re.findall(r"\bEPD_[A-Z0-9_]+", text))
    assert used - KNOWN == set(), "variables in compose/ that epd/config.py does not define"
    services = doc["services"]
    assert set(services) == {"redis", "gateway", *BACKENDS}
    assert services["redis"]["image"].startswith("redis:")
    for name, svc in services.items():
        if name == "redis":
            continue
        env = svc["environment"]
        cls = BACKENDS.get(name, config.GatewayConfig)
        assert required_vars(cls) <= set(env), f"{name}: required variables missing"
        module = svc["command"][-1]
        assert svc["command"][:2] == ["python", "-m"] and (ROOT / module.replace(".", "/") / "__main__.py").is_file()
        assert any(v.endswith(":/models:ro") for v in svc["volumes"]), f"{name}: model not mounted"
        assert svc["build"]["dockerfile"] == "compose/Dockerfile"
    for name in BACKENDS:
        svc = services[name]
        plural = {"encoder": "ENCODERS", "prefill": "PREFILLS", "decode": "DECODES"}[name]
        assert svc["deploy"]["replicas"] == f"${{EPD_{plural}:-1}}"
        assert svc["healthcheck"]["test"] == ["CMD-SHELL", "epd health 127.0.0.1:$${EPD_ADMIN_PORT}"]
        assert int(svc["environment"]["EPD_ADMIN_PORT"]) > 0
        stop = int(svc["stop_grace_period"].rstrip("s"))
        drain = float(interpolate(svc["environment"]["EPD_DRAIN_TIMEOUT_S"], {}))
        assert stop > drain, "compose would SIGKILL before the drain timeout"
    assert services["gateway"]["ports"] == ["${GATEWAY_PUBLISH_PORT:-8000}:8000"]
    with pytest.raises(ValueError, match="EPD_CLUSTER_SECRET"):
        interpolate(doc, {})  # bound beyond loopback: compose refuses to start without the cluster secret
    docker = DOCKERFILE.read_text()
    pin = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    torch_line = next(line for line in docker.splitlines() if "torch==" in line)
    assert f"torch=={pin}" in torch_line and "whl/cpu" in torch_line
    # torch first; then the project with the Mooncake build the services transfer with (EPD_TRANSFER_BACKEND=mooncake)
    assert docker.index("torch==") < docker.index('pip install --no-cache-dir ".[cpu]"')
    assert "COPY models" not in docker and "/models" in docker  # mounted, never baked in


def local_processes(env_overrides: dict[str, str], redis_url: str, model: Path, gateway_port: int):
    """``(name, argv, env)`` per replica of every non-Redis service, mapped to this host."""
    doc = interpolate(compose_doc(), env_overrides)
    out = []
    for name, svc in doc["services"].items():
        if name == "redis":
            continue
        replicas = int(svc.get("deploy", {}).get("replicas", 1))
        env = {k: str(v) for k, v in svc["environment"].items()}
        env["EPD_REDIS_URL"] = env["EPD_REDIS_URL"].replace("redis://redis:6379/0", redis_url)
        env["EPD_MODEL"] = str(model) if env["EPD_MODEL"] == "/models" else env["EPD_MODEL"]
        if env.get("EPD_HOST") in doc["services"]:  # a service name → loopback
            env["EPD_HOST"] = "127.0.0.1"
        if name == "gateway":
            env["EPD_GATEWAY_PORT"] = str(gateway_port)  # the published port
        else:
            env["EPD_ADMIN_PORT"] = "0"  # one port space for every replica here
        argv = [sys.executable if a == "python" else a for a in svc["command"]]
        for i in range(replicas):
            out.append((f"{name}-{i}", argv, {**env, "EPD_INSTANCE_ID": f"{name}-{i}"}))
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compose_services_serve_an_image_request(tmp_path, redis_url, tiny_model, hf_reference):
    url = redis_url.rsplit("/", 1)[0] + "/8"
    port = free_port()
    overrides = {"EPD_ENCODERS": "2", "EPD_TORCH_THREADS": "1", "EPD_KV_MEMORY_MB": "64",
                 "EPD_FEATURE_POOL_MB": "64", "EPD_PREFILL_BUFFER_MB": "64",
                 "EPD_CLUSTER_SECRET": "compose-test-cluster-secret-0123",
                 "EPD_DTYPE": "float32"}  # compose's default is auto (bf16 here); exactness is checked in fp32
    specs = local_processes(overrides, url, tiny_model, port)
    assert sorted(n for n, _, _ in specs) == ["decode-0", "encoder-0", "encoder-1", "gateway-0", "prefill-0"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("EPD_")}
    procs = {}
    try:
        for name, argv, env in specs:
            procs[name] = subprocess.Popen(argv, cwd=ROOT, env={**base, **env, "PYTHONUNBUFFERED": "1"},
                                           stdout=open(tmp_path / f"{name}.log", "wb"), stderr=subprocess.STDOUT)
        reg = Registry(url)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
            assert not dead, (dead, [(tmp_path / f"{n}.log").read_text()[-2000:] for n in dead])
            if len(reg.instances("encoder")) == 2 and reg.instances("prefill") and reg.instances("decode"):
                break
            time.sleep(0.3)
        else:
            pytest.fail("compose services did not register in time")
        time.sleep(0.5)  # gateway registry refresh
        # each backend's compose healthcheck command, with its container's EPD_ADMIN_PORT
        bin_dir = str(Path(sys.executable).parent)
        for inst in (i for i in reg.instances() if i.roles[0] in BACKENDS):  # the gateway registers too
            test = interpolate(compose_doc()["services"][inst.roles[0]]["healthcheck"]["test"][1], {})
            env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "EPD_ADMIN_PORT": inst.admin.split(":")[1]}
            done = subprocess.run(["sh", "-c", test], env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0 and done.stdout.strip() == "SERVING", (inst.instance_id, done)
        photos = sample_photos()
        images, text = [photos["astronaut"], photos["coffee"]], "What do these two pictures have in common?"
        status, headers, body = post(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "messages": user_message(images, text), "max_tokens": 16, "temperature": 0, "return_token_ids": True})
        assert status == 200, body
        assert headers["x-epd-route"] == "encode"
        assert body["choices"][0]["token_ids"] == hf_reference.greedy(images, text, 16)[1]
        for name in ("encoder-0", "encoder-1"):  # the two images were split across the replicas
            assert "encoded 1 image(s)" in (tmp_path / f"{name}.log").read_text()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        codes = {n: p.wait(timeout=60) for n, p in procs.items()}
    assert all(c == 0 for c in codes.values()), codes
