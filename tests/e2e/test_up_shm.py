"""`epd up` with no transfer setting moves features and KV over shared memory (every process is
on this host) and still gives the greedy tokens of HF ``generate``. The other e2e deployments
name ``--transfer-backend mooncake``, which keeps working the same way."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from epd.launcher import gateway_ready
from epd.registry.registry import Registry
from tests.conftest import free_port
from tests.e2e.http import user_message
from tests.e2e.test_topologies import MAX_NEW, ROOT, TEXT, Deployment, stream_ttft
from tests.model_fixtures import sample_photos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_epd_up_defaults_to_shm_and_matches_generate(tmp_path, redis_url, tiny_model, hf_reference):
    url = redis_url.rsplit("/", 1)[0] + "/11"  # apart from other modules' deployments
    photo = sample_photos()["astronaut"]
    reference = hf_reference.greedy([photo], TEXT, MAX_NEW)
    port, log = free_port(), tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if k not in ("EPD_TRANSFER_BACKEND", "EPD_TRANSFER_PROTOCOL")}
    env.update({"EPD_TORCH_THREADS": "1", "EPD_HEARTBEAT_S": "0.5", "EPD_REGISTRY_REFRESH_S": "0.2",
                "EPD_KV_MEMORY_MB": "64", "EPD_FEATURE_POOL_MB": "64", "EPD_PREFILL_BUFFER_MB": "64",
                "PYTHONUNBUFFERED": "1"})
    cmd = [sys.executable, "-m", "epd.cli", "up", "--topology", "E-P-D", "--port", str(port), "--redis-url", url,
           "--model", str(tiny_model)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    dep = Deployment("E-P-D", f"http://127.0.0.1:{port}", url, proc, log)
    try:
        deadline = time.monotonic() + 180
        while not gateway_ready(dep.url, {"encoder": 1, "prefill": 1, "decode": 1}):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text(errors="replace")[-4000:]
            time.sleep(0.3)
        assert "transfer backend shm (shared memory, this host)" in log.read_text(errors="replace")
        handles = [i.transfer_handle for i in Registry(url).instances() if "gateway" not in i.roles]
        assert len(handles) == 3 and all(h.startswith("shm://") for h in handles), handles
        body = {"messages": user_message([photo], TEXT), "max_tokens": MAX_NEW, "temperature": 0,
                "return_token_ids": True}
        _, ids, _ = stream_ttft(dep.url, body)
        assert ids == reference[1]
    finally:
        code = dep.stop()
    assert code == 0, log.read_text(errors="replace")[-3000:]
