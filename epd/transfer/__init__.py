"""One-sided transfer layer (DESIGN §6): registered regions, batched write/read by handle.

Backends: ``mooncake`` (Mooncake Transfer Engine, any host; transport by
``EPD_TRANSFER_PROTOCOL``, see :mod:`epd.transfer.protocols`) and ``shm`` (POSIX shared
memory, same host, host memory). Build one with :func:`create_backend`; regions are allocated
on the process device (``EPD_DEVICE``).

Names are imported on first use, so that :mod:`epd.config` can check a protocol through
:mod:`epd.transfer.protocols` without importing torch (the launcher never loads it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Region": "base", "TransferBackend": "base", "TransferStats": "base",
    "BACKENDS": "factory", "create_backend": "factory",
    "TransferError": "future", "TransferFuture": "future", "TransferState": "future",
    "PROTOCOLS": "protocols", "ProtocolError": "protocols",
    "merge_segments": "segments",
    "cleanup_stale_segments": "shm",
}

__all__ = [
    "BACKENDS", "PROTOCOLS", "ProtocolError", "Region", "TransferBackend", "TransferError", "TransferFuture",
    "TransferState", "TransferStats", "cleanup_stale_segments", "create_backend", "merge_segments",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'epd.transfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"epd.transfer.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from epd.transfer.base import Region, TransferBackend, TransferStats
    from epd.transfer.factory import BACKENDS, create_backend
    from epd.transfer.future import TransferError, TransferFuture, TransferState
    from epd.transfer.protocols import PROTOCOLS, ProtocolError
    from epd.transfer.segments import merge_segments
    from epd.transfer.shm import cleanup_stale_segments
