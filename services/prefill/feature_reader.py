"""The prefill engine's only view of where image features come from: :class:`FeatureReader`.

Prefill *prefetches* (EPD-Serve §3.2): when an encoder announces an image's features, a READ
starts at once and runs while the request waits in the queue; the engine polls it each step.
A request dropped while its read is in flight hands the read back with :meth:`discard`: its
buffer is freed once the read has settled (it may still land bytes there), never by waiting
on a possibly dead encoder.

Implementations: :class:`OneSidedFeatureReader` (asynchronous one-sided READ from the
encoder's registered pool into this instance's staging region) and :class:`LocalFeatureReader`
(an encoder pool in this process: ``epd.engine.local`` and tests).
"""

from __future__ import annotations

import abc

import torch

from epd.device import torch_dtype
from epd.engine.region_alloc import RangeAllocator
from epd.transfer import Region, TransferBackend, TransferError, TransferFuture
from services.prefill.records import FeatureRef


class FeatureReadError(RuntimeError):
    """The features could not be read: holder gone or unreachable, bad handle, deadline passed."""


class FeatureRead(abc.ABC):
    """One read in flight."""

    def __init__(self, ref: FeatureRef) -> None:
        self.ref = ref

    @abc.abstractmethod
    def done(self) -> bool:
        """Whether the read has settled (succeeded or failed)."""

    @abc.abstractmethod
    def result(self) -> torch.Tensor:
        """The features ``ref.shape`` of ``ref.dtype`` (a CPU copy); frees the read's buffer.
        Call once, after :meth:`done`.

        Raises:
            FeatureReadError: the read failed.
        """

    @property
    def elapsed_s(self) -> float:
        """Seconds the read took (0 when unknown)."""
        return 0.0


class FeatureReader(abc.ABC):
    """Starts reads of encoder features."""

    @abc.abstractmethod
    def start(self, ref: FeatureRef) -> FeatureRead:
        """Start reading ``ref``.

        Raises:
            epd.engine.region_alloc.RegionFull: no buffer space for ``ref.nbytes``.
            FeatureReadError: the read cannot start (nothing stays reserved).
        """

    @abc.abstractmethod
    def discard(self, read: FeatureRead) -> None:
        """Forget a read whose result nobody will take; its buffer is freed once it settles."""

    def reap(self) -> None:  # noqa: B027  (optional hook: readers without buffers have nothing to free)
        """Free the buffers of discarded reads that have settled since (called every step)."""


class _OneSidedRead(FeatureRead):
    def __init__(self, ref: FeatureRef, reader: OneSidedFeatureReader, offset: int, future: TransferFuture) -> None:
        super().__init__(ref)
        self.reader, self.offset, self.future = reader, offset, future

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> torch.Tensor:
        ref = self.ref
        try:
            self.future.wait(0)
            raw = self.reader.region.tensor[self.offset : self.offset + ref.nbytes]
            return raw.view(torch_dtype(ref.dtype)).view(list(ref.shape)).clone()
        except TransferError as exc:
            raise FeatureReadError(str(exc)) from exc
        finally:
            self.reader.staging.free(self.offset)

    @property
    def elapsed_s(self) -> float:
        return self.future.elapsed_s


class OneSidedFeatureReader(FeatureReader):
    """Asynchronous one-sided READs into a staging area of this instance's registered region.

    Args:
        transfer: the instance's transfer backend.
        region: its registered region.
        staging: the region's range allocator (shared with the KV staging).
    """

    def __init__(self, transfer: TransferBackend, region: Region, staging: RangeAllocator) -> None:
        self.transfer, self.region, self.staging = transfer, region, staging
        self.parked: list[_OneSidedRead] = []

    def start(self, ref: FeatureRef) -> FeatureRead:
        off = self.staging.allocate(ref.nbytes)
        try:
            fut = self.transfer.read_async(self.region, ref.session, [off], [ref.offset], [ref.nbytes])
        except TransferError as exc:
            self.staging.free(off)
            raise FeatureReadError(str(exc)) from exc
        return _OneSidedRead(ref, self, off, fut)

    def discard(self, read: FeatureRead) -> None:
        assert isinstance(read, _OneSidedRead)
        if read.done():
            self.staging.free(read.offset)
        else:
            self.parked.append(read)

    def reap(self) -> None:
        if self.parked:
            still = []
            for read in self.parked:
                if read.done():
                    self.staging.free(read.offset)
                else:
                    still.append(read)
            self.parked = still


class _LocalRead(FeatureRead):
    def __init__(self, ref: FeatureRef, data: torch.Tensor) -> None:
        super().__init__(ref)
        self.data = data

    def done(self) -> bool:
        return True

    def result(self) -> torch.Tensor:
        return self.data


class LocalFeatureReader(FeatureReader):
    """Copies features out of encoder pools of this process (synchronous, no buffer).

    Args:
        regions: transfer session name → the pool's uint8 region tensor.
    """

    def __init__(self, regions: dict[str, torch.Tensor]) -> None:
        self.regions = regions

    def start(self, ref: FeatureRef) -> FeatureRead:
        region = self.regions.get(ref.session)
        if region is None or ref.offset + ref.nbytes > region.numel():
            raise FeatureReadError(f"no local pool {ref.session!r} holding bytes [{ref.offset}, +{ref.nbytes})")
        raw = region[ref.offset : ref.offset + ref.nbytes]
        return _LocalRead(ref, raw.view(torch_dtype(ref.dtype)).view(list(ref.shape)).clone())

    def discard(self, read: FeatureRead) -> None:
        pass
