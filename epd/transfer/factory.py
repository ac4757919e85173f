"""Build a transfer backend by name (the factory lives beside its backends, not in their base)."""

from __future__ import annotations

from epd.transfer.base import TransferBackend
from epd.transfer.protocols import DEFAULT_PROTOCOL

BACKENDS = ("mooncake", "shm")


def create_backend(
    kind: str, host: str = "127.0.0.1", timeout_s: float = 5.0, protocol: str = DEFAULT_PROTOCOL
) -> TransferBackend:
    """Build a transfer backend.

    Args:
        kind: ``"mooncake"`` (Mooncake Transfer Engine; any host) or ``"shm"`` (POSIX shared
            memory; peers on the same host only, host memory only).
        host: address peers reach this process at (mooncake only).
        timeout_s: deadline of every operation in seconds.
        protocol: Mooncake transport, ``EPD_TRANSFER_PROTOCOL`` (``tcp``, ``rdma``, ``ascend``;
            see :mod:`epd.transfer.protocols`); ignored by ``shm``.

    Raises:
        ValueError: unknown ``kind``.
        TransferError: the backend could not start (for mooncake: also a protocol the installed
            build or this host lacks).
    """
    if kind == "mooncake":
        from epd.transfer.mooncake import MooncakeBackend

        return MooncakeBackend(host=host, timeout_s=timeout_s, protocol=protocol)
    if kind == "shm":
        from epd.transfer.shm import ShmBackend

        return ShmBackend(timeout_s=timeout_s)
    raise ValueError(f"unknown transfer backend {kind!r} (expected one of {', '.join(BACKENDS)})")
