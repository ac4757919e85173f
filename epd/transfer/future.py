"""Errors and completion futures of the one-sided transfer layer.

Lifecycle of one operation, as seen through :class:`TransferFuture` (the poll states
follow SGLang's disaggregation ``KVPoll``, reduced to three; ``FAILED`` is sticky)::

    validate (lengths, local + remote bounds) ─▶ PENDING ─▶ SUCCESS
                 │ TransferError, nothing moved      └────▶ FAILED (error or deadline)
"""

from __future__ import annotations

import concurrent.futures as cf
import enum
import time


class TransferError(RuntimeError):
    """A transfer failed: dead or unreachable peer, out-of-bounds segment, bad handle,
    deadline passed, or the backend is closed."""


class TransferState(enum.Enum):
    """Poll state of one operation (after SGLang's ``KVPoll``). ``FAILED`` is sticky."""

    PENDING = "pending"
    SUCCESS = "success"
    FAILED = "failed"


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
