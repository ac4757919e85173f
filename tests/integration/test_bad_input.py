"""Bad input at start: a checkpoint without the part a role loads, a transfer protocol that is
unknown or not available here. Each is one ``configuration error: EPD_…`` line and exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from epd.models.weights import SINGLE_FILE

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _strip(model: Path, out: Path, drop: tuple[str, ...]) -> Path:
    """A copy of ``model`` whose safetensors lacks every tensor whose key starts with ``drop``."""
    out.mkdir()
    for f in model.iterdir():
        if f.name != SINGLE_FILE:
            shutil.copy(f, out / f.name)
    with safe_open(model / SINGLE_FILE, framework="pt") as src:
        kept = {k: src.get_tensor(k) for k in src.keys() if not k.startswith(drop)}
    save_file(kept, out / SINGLE_FILE, metadata={"format": "pt"})
    return out


def _run(module: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EPD_")}
    full = {**base, "PYTHONUNBUFFERED": "1", "EPD_TORCH_THREADS": "1", "EPD_LOG_LEVEL": "WARNING",
            "EPD_TRANSFER_BACKEND": "shm", **env}
    return subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=150)


def _one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("configuration error")]
    return line


@pytest.fixture(scope="module")
def stripped(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model without its vision tower (``visual.*``), and without its LM (``model.*``, ``lm_head.*``)."""
    root = tmp_path_factory.mktemp("stripped")
    with safe_open(tiny_model / SINGLE_FILE, framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("visual.") for k in keys) and any(k.startswith("model.") for k in keys)
    return {
        "no-vision": _strip(tiny_model, root / "no-vision", ("visual.",)),
        "no-lm": _strip(tiny_model, root / "no-lm", ("model.", "lm_head.")),
    }


@pytest.mark.parametrize("module, part, needed_by", [
    ("services.encoder", "no-vision", "vision weights (needed by role encoder)"),
    ("services.prefill", "no-lm", "language weights (needed by role prefill or decode)"),
    ("services.decode", "no-lm", "language weights (needed by role prefill or decode)"),
])
def test_checkpoint_without_the_roles_part(stripped, redis_url, module, part, needed_by):
    model = stripped[part]
    line = _one_line(_run(module, EPD_REDIS_URL=redis_url, EPD_MODEL=str(model)))
    assert line == f"configuration error: EPD_MODEL: {model} has no {needed_by}"


def test_checkpoint_without_the_other_part_still_serves_the_role(stripped):
    """The encoder reads only the vision tower: a checkpoint without the LM is enough for it."""
    import torch

    from epd.models.qwen2_vl import Qwen2VLAdapter, role_parts

    adapter = Qwen2VLAdapter.load(stripped["no-lm"], dtype=torch.float32, parts=role_parts("encoder"))
    assert adapter.parts == {"vision"}


def test_unknown_transfer_protocol(tiny_model, redis_url):
    line = _one_line(_run("services.encoder", EPD_REDIS_URL=redis_url, EPD_MODEL=str(tiny_model),
                          EPD_TRANSFER_PROTOCOL="verbs"))
    assert line == "configuration error: EPD_TRANSFER_PROTOCOL: 'verbs' is not one of tcp, rdma, ascend"


def test_protocol_the_installed_build_lacks(tiny_model, redis_url):
    from epd.transfer.protocols import available_protocols, installed_build

    build = installed_build()
    if "ascend" in build.protocols:
        pytest.skip("the installed Mooncake build is the Ascend one")
    line = _one_line(_run("services.encoder", EPD_REDIS_URL=redis_url, EPD_MODEL=str(tiny_model),
                          EPD_TRANSFER_BACKEND="mooncake", EPD_TRANSFER_PROTOCOL="ascend"))
    assert line == (f"configuration error: EPD_TRANSFER_PROTOCOL: 'ascend' is not available: the installed build "
                    f"{build.distribution} lacks it; available: {', '.join(available_protocols())}")


def test_rdma_without_an_rdma_device(tiny_model, redis_url):
    from epd.transfer.protocols import rdma_devices

    if rdma_devices():
        pytest.skip("this host has an RDMA device")
    line = _one_line(_run("services.decode", EPD_REDIS_URL=redis_url, EPD_MODEL=str(tiny_model),
                          EPD_TRANSFER_BACKEND="mooncake", EPD_TRANSFER_PROTOCOL="rdma"))
    assert line == ("configuration error: EPD_TRANSFER_PROTOCOL: 'rdma' is not available: this host has no RDMA "
                    "device (/sys/class/infiniband is empty); available: tcp")
