"""One-sided transfer interface: registered regions, batched write/read, futures.

The receiver of a tensor allocates a region and publishes its handle (over ZeroMQ, in the
registry); the other side moves bytes into or out of it without the owner's code running
(the Mooncake Transfer Engine model: register memory, then ``batch_transfer_sync_write`` /
``_read`` against a peer's addresses). Control messages only ever carry a handle plus
offsets and byte lengths — never tensor bytes. Operation lifecycle and poll states:
:mod:`epd.transfer.future`; segment batches: :mod:`epd.transfer.segments`; building a backend:
:func:`epd.transfer.factory.create_backend`.

Design decisions:
- Memory is only obtained through :meth:`TransferBackend.allocate`: the shared-memory
  backend must create the memory itself, and Mooncake can register a buffer it allocated
  just as well, so one allocation call fits both. Callers view ``region.tensor`` (uint8)
  as any dtype with ``.view(dtype)``.
- Regions live on the process device (``EPD_DEVICE``, :func:`epd.device.get_device`): host
  memory for ``cpu``, device memory for ``cuda``/``npu`` (registered with the engine as it is;
  the KV and feature pools are used in place, never staged through host memory here). A backend
  that cannot address device memory (``shm``) refuses such a region.
- Work queued on an accelerator is fenced before a transfer reads or overwrites a device region:
  an event recorded on the caller's current stream when the operation is submitted is waited
  for on the thread that runs it, so later kernels (the next layers) keep running meanwhile.
- Handles are opaque strings that encode the remote region's byte size, so every segment
  is bounds-checked on both sides before a byte moves.
- Every operation has a deadline (``timeout_s``); nothing waits forever on a dead peer.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal

import torch

from epd import device as process_device
from epd.transfer.future import TransferError, TransferFuture, TransferState
from epd.transfer.segments import Segments, check_bounds, check_lists, merge_segments

__all__ = [
    "Op", "Region", "Segments", "TransferBackend", "TransferError", "TransferFuture", "TransferState",
    "TransferStats", "check_bounds", "merge_segments",
]

logger = logging.getLogger(__name__)

Op = Literal["write", "read"]


@dataclass(frozen=True)
class Region:
    """A locally registered, zero-filled memory region.

    Attributes:
        tensor: uint8 tensor of ``nbytes`` elements over the registered memory, on the device
            the region was allocated on (``tensor.device``); keeps the memory alive.
            Reinterpret with ``tensor.view(dtype)``.
        handle: opaque string peers pass to ``write``/``read`` to address this region.
        nbytes: size in bytes.
        base_ptr: address of byte 0 in this process (a device pointer for device memory).
    """

    tensor: torch.Tensor
    handle: str
    nbytes: int
    base_ptr: int

    @property
    def device(self) -> torch.device:
        """Where the region's memory lives."""
        return self.tensor.device


@dataclass
class TransferStats:
    """Counters of successful operations (for Prometheus); ``failures`` counts the rest."""

    bytes_written: int = 0
    bytes_read: int = 0
    transfers: int = 0
    failures: int = 0
    seconds: float = 0.0


def _fence(region: Region) -> torch.Event | None:
    """An event marking the work queued so far on the region's accelerator (``None`` on the host)."""
    if region.device.type == "cpu":
        return None
    event = torch.Event(device=region.device)
    event.record()
    return event


class TransferBackend(abc.ABC):
    """Allocate registered regions; move batched byte segments to/from peers' regions.

    Subclasses implement ``_allocate``, ``_free``, ``_remote_nbytes``, ``_transfer`` and
    ``_close_backend``; this class validates arguments, enforces deadlines, keeps stats.

    Args:
        timeout_s: deadline of every operation in seconds.
        watchdog: run synchronous operations on a worker thread so that a backend call
            which may block past the deadline (a network peer that stopped answering)
            cannot block the caller; inline otherwise.
    """

    kind: str = "base"

    def __init__(self, timeout_s: float = 5.0, watchdog: bool = False, workers: int = 4) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.stats = TransferStats()
        self._watchdog = watchdog
        self._pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="epd-transfer")
        self._lock = threading.Lock()
        self._regions: list[Region] = []
        self._closed = False

    # -- public API -------------------------------------------------------------------
    def allocate(self, nbytes: int, name_hint: str = "", device: torch.device | str | None = None) -> Region:
        """Allocate and register ``nbytes`` zero-filled bytes that peers can address.

        Args:
            nbytes: size in bytes.
            name_hint: a word for logs and (shm) segment names.
            device: where the memory lives; ``None``: the process device (``EPD_DEVICE``, see
                :func:`epd.device.get_device`): host memory for ``cpu``, device memory for
                ``cuda[:N]`` / ``npu[:N]``.

        Raises:
            ValueError: ``nbytes`` is not positive.
            TransferError: the backend is closed, cannot hold memory on ``device`` (shm: host
                memory only; mooncake: a build for that device), or registration failed.
        """
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes!r}")
        self._ensure_open()
        where = torch.device(device) if device is not None else process_device.get_device()
        region = self._allocate(nbytes, name_hint, where)
        with self._lock:
            self._regions.append(region)
        logger.debug("%s allocated %d bytes on %s as %s", self.kind, nbytes, where, region.handle)
        return region

    def free(self, region: Region) -> None:
        """Unregister and release one region allocated here (no-op if already freed).

        Operations still in flight on it may fail; ``region.tensor`` stays valid memory.
        """
        with self._lock:
            if not any(r is region for r in self._regions):
                return
            self._regions = [r for r in self._regions if r is not region]
        self._free(region)

    def write(
        self, local: Region, remote_handle: str, local_offsets: list[int], remote_offsets: list[int], lengths: list[int]
    ) -> None:
        """Copy local segments into the peer's region: ``remote[ro:ro+n] = local[lo:lo+n]``.

        All offsets and lengths are in bytes; segment ``i`` is
        ``(local_offsets[i], remote_offsets[i], lengths[i])``.

        Raises:
            TransferError: bad handle, out-of-bounds segment (before any byte moves), dead
                peer, or no completion within ``timeout_s``.
        """
        self._start("write", local, remote_handle, Segments(local_offsets, remote_offsets, lengths), True)

    def read(
        self, local: Region, remote_handle: str, local_offsets: list[int], remote_offsets: list[int], lengths: list[int]
    ) -> None:
        """Copy the peer's segments into the local region: ``local[lo:lo+n] = remote[ro:ro+n]``.

        Raises:
            TransferError: as :meth:`write`.
        """
        self._start("read", local, remote_handle, Segments(local_offsets, remote_offsets, lengths), True)

    def write_async(
        self, local: Region, remote_handle: str, local_offsets: list[int], remote_offsets: list[int], lengths: list[int]
    ) -> TransferFuture:
        """Start :meth:`write`; validation errors raise here, transfer errors on ``wait``."""
        return self._start("write", local, remote_handle, Segments(local_offsets, remote_offsets, lengths), False)

    def read_async(
        self, local: Region, remote_handle: str, local_offsets: list[int], remote_offsets: list[int], lengths: list[int]
    ) -> TransferFuture:
        """Start :meth:`read`; validation errors raise here, transfer errors on ``wait``."""
        return self._start("read", local, remote_handle, Segments(local_offsets, remote_offsets, lengths), False)

    def close(self) -> None:
        """Wait for in-flight operations, then unregister and free every region. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            regions, self._regions = self._regions, []
        self._pool.shutdown(wait=True, cancel_futures=True)
        for region in regions:
            try:
                self._free(region)
            except Exception:
                logger.exception("%s: freeing %s failed", self.kind, region.handle)
        self._close_backend()
        logger.debug("%s backend closed", self.kind)

    def __enter__(self) -> TransferBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- subclass hooks ---------------------------------------------------------------
    @abc.abstractmethod
    def _allocate(self, nbytes: int, name_hint: str, device: torch.device) -> Region:
        """Allocate ``nbytes`` zero-filled bytes on ``device`` and register them; raise TransferError."""

    @abc.abstractmethod
    def _free(self, region: Region) -> None: ...

    @abc.abstractmethod
    def _remote_nbytes(self, remote_handle: str) -> int:
        """Parse the handle; return the remote region size in bytes or raise TransferError."""

    @abc.abstractmethod
    def _transfer(self, op: Op, local: Region, remote_handle: str, segs: Segments) -> None:
        """Move validated segments, blocking; raise TransferError on failure."""

    @abc.abstractmethod
    def _close_backend(self) -> None:
        """Release backend-wide resources after all regions are freed."""

    # -- internals ----------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if self._closed:
            raise TransferError(f"{self.kind} transfer backend is closed")

    def _start(self, op: Op, local: Region, remote_handle: str, segs: Segments, sync: bool) -> TransferFuture:
        self._ensure_open()
        check_lists(*segs)
        check_bounds(segs.local_offsets, segs.lengths, local.nbytes, "local")
        check_bounds(segs.remote_offsets, segs.lengths, self._remote_nbytes(remote_handle), "remote")
        nbytes = sum(segs.lengths)
        fence = _fence(local)
        if sync and not self._watchdog:
            self._timed(op, nbytes, local, remote_handle, segs, fence)
            return TransferFuture.completed(nbytes)
        try:
            inner = self._pool.submit(self._timed, op, nbytes, local, remote_handle, segs, fence)
        except RuntimeError as exc:  # pool shut down by a concurrent close()
            raise TransferError(f"{self.kind} transfer backend is closed") from exc
        future = TransferFuture(inner, nbytes, self.timeout_s)
        if sync:
            future.wait()
        return future

    def _timed(self, op: Op, nbytes: int, local: Region, remote_handle: str, segs: Segments,
               fence: torch.Event | None = None) -> None:
        start = time.monotonic()
        try:
            if fence is not None:  # the kernels that wrote (or still read) these bytes are done
                fence.synchronize()
            self._transfer(op, local, remote_handle, segs)
        except BaseException:
            with self._lock:
                self.stats.failures += 1
            raise
        elapsed = time.monotonic() - start
        with self._lock:
            self.stats.transfers += 1
            self.stats.seconds += elapsed
            if op == "write":
                self.stats.bytes_written += nbytes
            else:
                self.stats.bytes_read += nbytes
