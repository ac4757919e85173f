"""Transfer backend over the Mooncake Transfer Engine (``mooncake.engine.TransferEngine``).

Each backend owns one engine, initialised in peer-to-peer handshake mode
(``initialize(host, "P2PHANDSHAKE", protocol, "")``; no metadata server), which listens on
an RPC port of its own. Regions are torch-allocated CPU buffers registered with
``register_memory``; peers address them as ``mooncake://<host>:<rpc_port>/<base_hex>/<nbytes>``
and move batches with ``batch_transfer_sync_write`` / ``batch_transfer_sync_read``
(target ``"<host>:<rpc_port>"``, absolute remote addresses).

Failure behaviour measured with mooncake-transfer-engine-non-cuda over loopback TCP:
- nothing listening on the port, peer process killed, or peer engine destroyed: the call
  returns ``-1`` within ~1 ms (a killed peer's cached connection: up to ~1 s of
  reconnect attempts);
- remote address outside the peer's registered memory: the peer rejects it, ``-1``;
- peer alive but not answering (``SIGSTOP``): the call blocks for ``MC_TRANSFER_TIMEOUT``
  seconds (default 30, minimum 5) and then returns ``-1``. Hence every operation runs on
  a worker thread and the caller gives up after ``timeout_s``; the stuck call ends by
  itself, and ``close()`` waits for it before unregistering memory, so the engine never
  touches freed buffers. Until then a *read* that timed out may still land bytes in its
  local segments: do not reuse them before the peer is known dead or the call returned.
- more than ~2,000 segments queued for one peer: rejected (``-1``); batches are chunked.
- ``get_batch_transfer_status`` busy-waits until the batch ends and frees the batch id,
  so a second call on the same id is a use-after-free (segfault). It is not used here.

Logging: the library logs through glog at INFO by default. ``MC_LOG_LEVEL`` (``TRACE``,
``INFO``, ``WARNING``, ``ERROR``) is read once, when ``mooncake.engine`` is first
imported; this module sets it to ``ERROR`` unless the environment already chose.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

import torch

from epd.transfer.base import Op, Region, Segments, TransferBackend, TransferError

logger = logging.getLogger(__name__)

_HANDLE_RE = re.compile(r"^mooncake://([^/\s]+:\d+)/([0-9a-fA-F]+)/(\d+)$")
_MIN_LIBRARY_TIMEOUT_S = 5  # the library clamps MC_TRANSFER_TIMEOUT to at least 5 s
# The TCP transport rejects a batch once too many segments are queued for one peer (measured:
# 2,049 segments pass, 3,000 fail with "TCP lane queue-full rejection"). Batches are split into
# chunks of this many segments so that even `workers` concurrent ones stay under the limit.
MAX_SEGMENTS_PER_CALL = 512


def _import_engine() -> Any:
    # Both variables are read by the C++ library, not by this project's config: the log level
    # at import, the per-transfer timeout when a TransferEngine is constructed.
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise TransferError(
            f"mooncake transfer backend needs the 'mooncake-transfer-engine' package and Debian's libibverbs1: {exc}"
        ) from exc
    return TransferEngine


def parse_handle(handle: str) -> tuple[str, int, int]:
    """Split a mooncake handle into ``(endpoint "host:port", base_address, nbytes)``.

    Raises:
        TransferError: not a ``mooncake://`` handle of this format.
    """
    m = _HANDLE_RE.match(handle)
    if m is None:
        raise TransferError(f"not a mooncake transfer handle: {handle!r}")
    return m.group(1), int(m.group(2), 16), int(m.group(3))


class MooncakeBackend(TransferBackend):
    """Transfer backend on the Mooncake Transfer Engine (TCP on CPU; RDMA/Ascend by protocol).

    Args:
        host: address peers reach this engine at; the RPC port is chosen by the library.
        timeout_s: deadline of every operation in seconds.
        protocol: Mooncake transport (``"tcp"`` here; ``"rdma"``, ``"ascend"`` elsewhere).
        device_name: comma-separated NIC/device filter, ``""`` for all.
        workers: threads that run transfers (a peer that stopped answering pins one for up
            to ``max(5, timeout_s)`` seconds).

    Raises:
        TransferError: the library is missing or the engine failed to start.
    """

    kind = "mooncake"

    def __init__(
        self,
        host: str = "127.0.0.1",
        timeout_s: float = 5.0,
        protocol: str = "tcp",
        device_name: str = "",
        workers: int = 4,
    ) -> None:
        super().__init__(timeout_s=timeout_s, watchdog=True, workers=workers)
        engine_cls = _import_engine()
        os.environ["MC_TRANSFER_TIMEOUT"] = str(max(_MIN_LIBRARY_TIMEOUT_S, math.ceil(timeout_s)))
        self._engine = engine_cls()
        ret = self._engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if ret != 0:
            self._pool.shutdown(wait=False)
            raise TransferError(f"mooncake engine failed to start on {host} (protocol {protocol}): code {ret}")
        self.endpoint = f"{host}:{self._engine.get_rpc_port()}"
        logger.info("mooncake transfer engine listening on %s (%s)", self.endpoint, protocol)

    def _allocate(self, nbytes: int, name_hint: str) -> Region:
        tensor = torch.zeros(nbytes, dtype=torch.uint8)
        ptr = tensor.data_ptr()
        ret = self._engine.register_memory(ptr, nbytes)
        if ret != 0:
            raise TransferError(f"mooncake register_memory({nbytes} bytes) failed: code {ret}")
        handle = f"mooncake://{self.endpoint}/{ptr:x}/{nbytes}"
        return Region(tensor=tensor, handle=handle, nbytes=nbytes, base_ptr=ptr)

    def _free(self, region: Region) -> None:
        ret = self._engine.unregister_memory(region.base_ptr)
        if ret != 0:
            logger.warning("mooncake unregister_memory(%s) failed: code %d", region.handle, ret)

    def _remote_nbytes(self, remote_handle: str) -> int:
        return parse_handle(remote_handle)[2]

    def _transfer(self, op: Op, local: Region, remote_handle: str, segs: Segments) -> None:
        lengths = segs.lengths
        if not lengths:
            return
        endpoint, remote_base, _ = parse_handle(remote_handle)
        local_ptrs = [local.base_ptr + off for off in segs.local_offsets]
        remote_ptrs = [remote_base + off for off in segs.remote_offsets]
        call = self._engine.batch_transfer_sync_write if op == "write" else self._engine.batch_transfer_sync_read
        for i in range(0, len(lengths), MAX_SEGMENTS_PER_CALL):
            j = i + MAX_SEGMENTS_PER_CALL
            ret = call(endpoint, local_ptrs[i:j], remote_ptrs[i:j], lengths[i:j])
            if ret != 0:
                raise TransferError(
                    f"mooncake {op} of {sum(lengths)} bytes in {len(lengths)} segments with {endpoint} "
                    f"failed (code {ret}): peer dead, unreachable, or region no longer registered"
                )

    def _close_backend(self) -> None:
        # Destroying the engine closes its peer connections and stops its listener.
        self._engine = None
