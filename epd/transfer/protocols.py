"""Mooncake transports (``EPD_TRANSFER_PROTOCOL``) and what the installed Mooncake build offers.

Names: ``tcp`` (any host, the default), ``rdma`` (InfiniBand/RoCE NICs, GPUDirect for device
memory), ``ascend`` (Ascend NPUs: HCCL or ADXL, depending on the build).

How Mooncake picks its transport (kvcache-ai/Mooncake at 3b5a594, the source of 0.3.13.post1):

- ``TransferEngine.initialize(host, metadata, protocol, device_name)`` of the Python API
  (``mooncake-integration/transfer_engine/transfer_engine_py.cpp``, ``initializeExt``) builds an
  engine with topology auto-discovery in every build but the EFA and CXI ones; ``protocol`` then
  only selects a memory allocator (nvlink, hip, musa). The transport is chosen in
  ``TransferEngineImpl::init`` (``mooncake-transfer-engine/src/transfer_engine_impl.cpp``):
  ``MC_FORCE_TCP`` set → TCP alone; an Ascend build (``USE_ASCEND``: HCCL, ``USE_ASCEND_DIRECT``:
  ADXL) → the ``"ascend"`` transport; otherwise RDMA when discovery finds an RDMA device (HCA),
  else TCP, silently.
- Ascend's transport is installed under the one name ``"ascend"``
  (``MultiTransport::installTransport``, ``src/multi_transport.cpp``) whichever Ascend backend was
  compiled in; ``hccl`` and ``ascend_direct`` appear only as flag defaults of C++ examples.

So :func:`engine_environment` steers the engine: ``tcp`` sets ``MC_FORCE_TCP=1``; ``rdma`` and
``ascend`` clear it, and :func:`check_protocol` first makes sure the choice can happen (an RDMA
device in ``/sys/class/infiniband``; an Ascend build installed), because the engine would
otherwise fall back to TCP without saying so.

Builds on PyPI (each ships the same ``mooncake`` package: install exactly one)::

    distribution                        extra      devices     protocols
    mooncake-transfer-engine-non-cuda   [cpu]      cpu         tcp, rdma
    mooncake-transfer-engine            [cuda]     cpu, cuda   tcp, rdma   (CUDA 12: libcudart.so.12)
    mooncake-transfer-engine-cuda13     -          cpu, cuda   tcp, rdma   (CUDA 13)
    mooncake-transfer-engine-npu        [ascend]   cpu, npu    tcp, ascend (ADXL; needs CANN)

Checked by downloading each wheel: the CUDA one links ``libcudart.so.12``; the npu one ships
``ascend_transport.so`` with ``AscendDirectTransport`` compiled in.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

PROTOCOLS = ("tcp", "rdma", "ascend")
DEFAULT_PROTOCOL = "tcp"
RDMA_SYSFS = "/sys/class/infiniband"  # what ibv_get_device_list (Mooncake's topology discovery) enumerates


class ProtocolError(ValueError):
    """The protocol is unknown or the installed Mooncake build (or this host) cannot run it."""


@dataclass(frozen=True)
class MooncakeBuild:
    """One PyPI build of the Mooncake Transfer Engine.

    Attributes:
        distribution: its PyPI name.
        devices: ``torch.device`` types whose memory it can register and move.
        protocols: the transports its ``initialize`` can install (of :data:`PROTOCOLS`).
    """

    distribution: str
    devices: tuple[str, ...]
    protocols: tuple[str, ...]


BUILDS = (
    MooncakeBuild("mooncake-transfer-engine-non-cuda", ("cpu",), ("tcp", "rdma")),
    MooncakeBuild("mooncake-transfer-engine", ("cpu", "cuda"), ("tcp", "rdma")),
    MooncakeBuild("mooncake-transfer-engine-cuda13", ("cpu", "cuda"), ("tcp", "rdma")),
    MooncakeBuild("mooncake-transfer-engine-npu", ("cpu", "npu"), ("tcp", "ascend")),
)
# What the libraries of a build hold (a build from source carries a PyPI name that says nothing
# of its hardware: Mooncake's Ascend instructions build ``mooncake_transfer_engine*.whl``).
_ASCEND_MARK = b"Failed to install Ascend transport"  # compiled only under USE_ASCEND / USE_ASCEND_DIRECT
_CUDA_MARK = b"libcudart.so"  # a CUDA build links the CUDA runtime
_LIBRARIES = ("engine.so", "libtransfer_engine.so")
_SOURCE_NAME = "mooncake-transfer-engine"


@functools.lru_cache(maxsize=1)
def installed_build() -> MooncakeBuild | None:
    """The Mooncake build installed in this environment, ``None`` when there is none.

    Nothing is imported: the distribution name comes from package metadata, the devices and
    protocols from the table above; for ``mooncake-transfer-engine`` (also the name of a build
    from source) or a name the table lacks, from markers in the package's libraries (an Ascend
    transport compiled in, a CUDA runtime dependency).
    """
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        return None
    for build in BUILDS:
        if build.distribution == _SOURCE_NAME:  # also what a build from source is called
            continue
        try:
            importlib.metadata.distribution(build.distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        return build
    names = [d.metadata["Name"] for d in importlib.metadata.distributions()
             if (d.metadata["Name"] or "").lower().startswith("mooncake")]
    blobs = b""
    for lib in _LIBRARIES:
        path = Path(spec.submodule_search_locations[0]) / lib
        if path.is_file():
            blobs += path.read_bytes()
    name = names[0] if names else "mooncake (no package metadata)"
    if _ASCEND_MARK in blobs:
        return MooncakeBuild(name, ("cpu", "npu"), ("tcp", "ascend"))
    if _CUDA_MARK in blobs:
        return MooncakeBuild(name, ("cpu", "cuda"), ("tcp", "rdma"))
    return MooncakeBuild(name, ("cpu",), ("tcp", "rdma"))


def rdma_devices(sysfs: str = RDMA_SYSFS) -> list[str]:
    """Names of this host's RDMA devices (``mlx5_0``, …); empty when it has none."""
    try:
        return sorted(os.listdir(sysfs))
    except OSError:
        return []


def available_protocols(build: MooncakeBuild | None = None, sysfs: str = RDMA_SYSFS) -> list[str]:
    """The protocols that can run here: those of ``build`` (default: the installed one), less
    ``rdma`` on a host without an RDMA device. Empty when no Mooncake build is installed."""
    build = build if build is not None else installed_build()
    if build is None:
        return []
    return [p for p in build.protocols if p != "rdma" or rdma_devices(sysfs)]


def check_protocol(protocol: str, device: str = "cpu", build: MooncakeBuild | None = None,
                   sysfs: str = RDMA_SYSFS) -> str:
    """Validate ``EPD_TRANSFER_PROTOCOL`` (and ``EPD_DEVICE``) against the installed build.

    Args:
        protocol: one of :data:`PROTOCOLS`.
        device: ``EPD_DEVICE`` (``cpu``, ``cuda[:N]``, ``npu[:N]``): regions live there, so the
            build must be able to register that memory.
        build: the build to check against (default: the installed one).
        sysfs: where RDMA devices are listed.

    Returns:
        ``protocol``.

    Raises:
        ProtocolError: an unknown name, no Mooncake build installed, or one that lacks the
            protocol or the device (the message lists what is available).
    """
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
    build = build if build is not None else installed_build()
    if build is None:
        raise ProtocolError(
            f"{protocol!r} needs a Mooncake build and none is installed "
            "(pip install 'epd-serve[cpu]', '[cuda]' or '[ascend]'; or EPD_TRANSFER_BACKEND=shm on one host)"
        )
    available = available_protocols(build, sysfs)
    if protocol not in available:
        why = (f"this host has no RDMA device ({sysfs} is empty)" if protocol in build.protocols
               else f"the installed build {build.distribution} lacks it")
        raise ProtocolError(f"{protocol!r} is not available: {why}; available: {', '.join(available)}")
    kind = device.split(":", 1)[0]
    if kind not in build.devices:
        extra = {"cuda": "[cuda]", "npu": "[ascend]"}.get(kind, "")
        raise ProtocolError(
            f"{protocol!r} with EPD_DEVICE={device}: the installed build {build.distribution} registers "
            f"only {', '.join(build.devices)} memory (pip install 'epd-serve{extra}' for a {kind} build)"
        )
    return protocol


def engine_environment(protocol: str) -> dict[str, str | None]:
    """The Mooncake variables that make ``initialize`` install ``protocol`` (module docstring):
    ``{name: value}``, ``None`` meaning *unset*. Read by the library in ``initialize``."""
    return {"MC_FORCE_TCP": "1" if protocol == "tcp" else None}
