"""One-sided transfer layer (DESIGN §6): registered regions, batched write/read by handle.

Backends: ``mooncake`` (Mooncake Transfer Engine, any host) and ``shm`` (POSIX shared
memory, same host). Build one with :func:`create_backend`.
"""

from epd.transfer.base import (
    Region,
    TransferBackend,
    TransferError,
    TransferFuture,
    TransferState,
    TransferStats,
    create_backend,
    merge_segments,
)
from epd.transfer.shm import cleanup_stale_segments

__all__ = [
    "Region",
    "TransferBackend",
    "TransferError",
    "TransferFuture",
    "TransferState",
    "TransferStats",
    "cleanup_stale_segments",
    "create_backend",
    "merge_segments",
]
