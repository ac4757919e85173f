"""One-sided transfer interface: registered regions, batched write/read, futures.

The receiver of a tensor allocates a region and publishes its handle (over ZeroMQ, in the
registry); the other side moves bytes into or out of it without the owner's code running
(the Mooncake Transfer Engine model: register memory, then ``batch_transfer_sync_write`` /
``_read`` against a peer's addresses). Control messages only ever carry a handle plus
offsets and byte lengths — never tensor bytes.

Lifecycle of one operation, as seen through :class:`TransferFuture` (the poll states
follow SGLang's disaggregation ``KVPoll``, reduced to three; ``FAILED`` is sticky)::

    validate (lengths, local + remote bounds) ─▶ PENDING ─▶ SUCCESS
                 │ TransferError, nothing moved      └────▶ FAILED (error or deadline)

Design decisions:
- Memory is only obtained through :meth:`TransferBackend.allocate`: the shared-memory
  backend must create the memory itself, and Mooncake can register a buffer it allocated
  just as well, so one allocation call fits both. Callers view ``region.tensor`` (uint8)
  as any dtype with ``.view(dtype)``.
- Handles are opaque strings that encode the remote region's byte size, so every segment
  is bounds-checked on both sides before a byte moves.
- Every operation has a deadline (``timeout_s``); nothing waits forever on a dead peer.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

logger = logging.getLogger(__name__)

Op = Literal["write", "read"]


class Segments(NamedTuple):
    """A batch of byte segments: segment ``i`` is ``(local_offsets[i], remote_offsets[i], lengths[i])``."""

    local_offsets: list[int]
    remote_offsets: list[int]
    lengths: list[int]


class TransferError(RuntimeError):
    """A transfer failed: dead or unreachable peer, out-of-bounds segment, bad handle,
    deadline passed, or the backend is closed."""


class TransferState(enum.Enum):
    """Poll state of one operation (after SGLang's ``KVPoll``). ``FAILED`` is sticky."""

    PENDING = "pending"
    SUCCESS = "success"
    FAILED = "failed"


@dataclass(frozen=True)
class Region:
    """A locally registered, zero-filled memory region.

    Attributes:
        tensor: uint8 CPU tensor of ``nbytes`` elements over the registered memory; keeps
            the memory alive. Reinterpret with ``tensor.view(dtype)``.
        handle: opaque string peers pass to ``write``/``read`` to address this region.
        nbytes: size in bytes.
        base_ptr: address of byte 0 in this process.
    """

    tensor: torch.Tensor
    handle: str
    nbytes: int
    base_ptr: int


@dataclass
class TransferStats:
    """Counters of successful operations (for Prometheus); ``failures`` counts the rest."""

    bytes_written: int = 0
    bytes_read: int = 0
    transfers: int = 0
    failures: int = 0
    seconds: float = 0.0


class TransferFuture:
    """Completion of one asynchronous batched operation.

    The deadline is ``submit time + timeout_s``; once it passes while still pending, the
    state becomes ``FAILED`` (sticky) even if the backend later finishes.
    """

    def __init__(self, inner: cf.Future, nbytes: int, timeout_s: float) -> None:
        self._inner = inner
        self._start = time.monotonic()
        self._timeout_s = timeout_s
        self._deadline = self._start + timeout_s
        self._end: float | None = None
        self._failed_reason: str | None = None
        self.nbytes = nbytes
        inner.add_done_callback(self._on_done)

    @classmethod
    def completed(cls, nbytes: int) -> TransferFuture:
        """A future for an operation that already succeeded inline."""
        inner: cf.Future = cf.Future()
        inner.set_result(None)
        return cls(inner, nbytes, timeout_s=float("inf"))

    def _on_done(self, _inner: cf.Future) -> None:
        self._end = time.monotonic()
        if self._end > self._deadline and self._failed_reason is None:
            self._failed_reason = f"transfer finished {self._end - self._deadline:.3f} s after its deadline"

    @property
    def state(self) -> TransferState:
        if self._failed_reason is not None:
            return TransferState.FAILED
        if self._inner.done():
            if self._inner.cancelled() or self._inner.exception() is not None:
                return TransferState.FAILED
            return TransferState.SUCCESS
        if time.monotonic() > self._deadline:
            self._failed_reason = f"transfer of {self.nbytes} bytes not done within its {self._timeout_s:.3f} s timeout"
            return TransferState.FAILED
        return TransferState.PENDING

    def done(self) -> bool:
        """True once the state is ``SUCCESS`` or ``FAILED``; never blocks."""
        return self.state is not TransferState.PENDING

    @property
    def elapsed_s(self) -> float:
        """Seconds from submission to completion (to now while pending)."""
        end = self._end if self._end is not None else time.monotonic()
        return end - self._start

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the operation finishes.

        Args:
            timeout_s: at most this many seconds; ``None`` waits until the operation's own
                deadline.

        Raises:
            TransferError: the operation failed, or it was not done in time (the state is
                ``FAILED`` only if the operation's own deadline passed).
        """
        budget = max(0.0, self._deadline - time.monotonic())
        if timeout_s is not None:
            budget = min(budget, timeout_s)
        try:
            self._inner.result(timeout=budget)
        except cf.TimeoutError:
            if self.state is TransferState.FAILED:
                raise TransferError(self._failed_reason) from None
            raise TransferError(f"transfer of {self.nbytes} bytes not done after waiting {budget:.3f} s") from None
        except TransferError:
            raise
        except Exception as exc:  # a backend bug must still surface as a failed transfer
            raise TransferError(f"transfer failed: {exc!r}") from exc
        if self._failed_reason is not None:
            raise TransferError(self._failed_reason)


def merge_segments(
    local_offsets: list[int], remote_offsets: list[int], lengths: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """Coalesce consecutive segments that are contiguous on both sides into one.

    Segment ``i+1`` joins segment ``i`` when it starts where ``i`` ends both locally and
    remotely. List order is kept (sort first to merge more); zero-length segments are
    dropped. Used to send a run of consecutive KV blocks as one transfer (DESIGN §6).

    Example: ``([0, 4, 16], [100, 104, 200], [4, 4, 4])`` → ``([0, 16], [100, 200], [8, 4])``.
    """
    _check_lists(local_offsets, remote_offsets, lengths)
    out_l: list[int] = []
    out_r: list[int] = []
    out_n: list[int] = []
    for lo, ro, n in zip(local_offsets, remote_offsets, lengths, strict=True):
        if n == 0:
            continue
        if out_n and out_l[-1] + out_n[-1] == lo and out_r[-1] + out_n[-1] == ro:
            out_n[-1] += n
        else:
            out_l.append(lo)
            out_r.append(ro)
            out_n.append(n)
    return out_l, out_r, out_n


def _check_lists(local_offsets: list[int], remote_offsets: list[int], lengths: list[int]) -> None:
    if not len(local_offsets) == len(remote_offsets) == len(lengths):
        raise TransferError(
            f"segment lists differ in length: {len(local_offsets)} local, {len(remote_offsets)} remote, "
            f"{len(lengths)} lengths"
        )
    for x in (*local_offsets, *remote_offsets, *lengths):
        if x < 0:
            raise TransferError(f"negative offset or length {x}")


def check_bounds(offsets: list[int], lengths: list[int], size: int, side: str) -> None:
    """Raise :class:`TransferError` if any ``[offset, offset + length)`` exceeds ``size`` bytes."""
    for off, n in zip(offsets, lengths, strict=True):
        if off + n > size:
            raise TransferError(f"{side} segment [{off}, {off + n}) is outside the {size}-byte region")


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
    def allocate(self, nbytes: int, name_hint: str = "") -> Region:
        """Allocate and register ``nbytes`` zero-filled bytes that peers can address.

        Raises:
            ValueError: ``nbytes`` is not positive.
            TransferError: the backend is closed or registration failed.
        """
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes!r}")
        self._ensure_open()
        region = self._allocate(nbytes, name_hint)
        with self._lock:
            self._regions.append(region)
        logger.debug("%s allocated %d bytes as %s", self.kind, nbytes, region.handle)
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
    def _allocate(self, nbytes: int, name_hint: str) -> Region: ...

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
        _check_lists(*segs)
        check_bounds(segs.local_offsets, segs.lengths, local.nbytes, "local")
        check_bounds(segs.remote_offsets, segs.lengths, self._remote_nbytes(remote_handle), "remote")
        nbytes = sum(segs.lengths)
        if sync and not self._watchdog:
            self._timed(op, nbytes, local, remote_handle, segs)
            return TransferFuture.completed(nbytes)
        try:
            inner = self._pool.submit(self._timed, op, nbytes, local, remote_handle, segs)
        except RuntimeError as exc:  # pool shut down by a concurrent close()
            raise TransferError(f"{self.kind} transfer backend is closed") from exc
        future = TransferFuture(inner, nbytes, self.timeout_s)
        if sync:
            future.wait()
        return future

    def _timed(self, op: Op, nbytes: int, local: Region, remote_handle: str, segs: Segments) -> None:
        start = time.monotonic()
        try:
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


def create_backend(kind: str, host: str = "127.0.0.1", timeout_s: float = 5.0) -> TransferBackend:
    """Build a transfer backend.

    Args:
        kind: ``"mooncake"`` (Mooncake Transfer Engine over TCP; any host) or ``"shm"``
            (POSIX shared memory; peers on the same host only).
        host: address peers reach this process at (mooncake only).
        timeout_s: deadline of every operation in seconds.

    Raises:
        ValueError: unknown ``kind``.
        TransferError: the backend could not start.
    """
    if kind == "mooncake":
        from epd.transfer.mooncake import MooncakeBackend

        return MooncakeBackend(host=host, timeout_s=timeout_s)
    if kind == "shm":
        from epd.transfer.shm import ShmBackend

        return ShmBackend(timeout_s=timeout_s)
    raise ValueError(f"unknown transfer backend {kind!r} (expected 'mooncake' or 'shm')")
