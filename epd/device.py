"""The one place the compute device is chosen (``EPD_DEVICE``: ``cpu``, ``cuda`` or ``npu``).

Every tensor the runtime allocates goes through :func:`get_device` / :func:`empty`, so moving
a deployment from CPU to a GPU or an Ascend NPU is a configuration change. ``npu`` imports
``torch_npu`` (the optional ``[ascend]`` extra) only when it is asked for.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

_SUPPORTED = ("cpu", "cuda", "npu")
_device_name = "cpu"


class DeviceError(RuntimeError):
    """The requested device is unknown or not usable on this machine."""


def set_device(name: str) -> torch.device:
    """Select the process-wide device.

    Args:
        name: ``cpu``, ``cuda``, ``cuda:N``, ``npu`` or ``npu:N``.

    Raises:
        DeviceError: unknown name, no CUDA device, or ``torch_npu`` not installed.
    """
    global _device_name
    kind = name.split(":", 1)[0]
    if kind not in _SUPPORTED:
        raise DeviceError(f"EPD_DEVICE={name!r}: expected one of {', '.join(_SUPPORTED)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("EPD_DEVICE=cuda but torch sees no CUDA device")
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401  (registers the npu backend)
        except ImportError as exc:
            raise DeviceError("EPD_DEVICE=npu needs torch_npu: pip install 'epd-serve[ascend]'") from exc
    _device_name = name
    get_device.cache_clear()
    return get_device()


def set_threads(intra_op: int, inter_op: int) -> tuple[int, int]:
    """Size this process's torch thread pools (process-global; host threads on any device).

    Args:
        intra_op: ``EPD_TORCH_THREADS``; 0 keeps torch's default (``OMP_NUM_THREADS``, else
            one per core).
        inter_op: ``EPD_TORCH_INTEROP_THREADS``; 0 keeps torch's default. torch allows this
            only once and only before its inter-op pool starts; a later call with the value
            already in place does nothing, a different one logs a warning and keeps torch's
            (raising would take a serving process down over a pool size).

    Returns:
        The pool sizes now in effect: ``(intra-op, inter-op)``.
    """
    if intra_op:
        torch.set_num_threads(intra_op)
    if inter_op and torch.get_num_interop_threads() != inter_op:
        try:
            torch.set_num_interop_threads(inter_op)
        except RuntimeError as exc:  # "cannot set number of interop threads after parallel work has started"
            logger.warning("EPD_TORCH_INTEROP_THREADS=%d not applied (%s); keeping %d",
                           inter_op, exc, torch.get_num_interop_threads())
    return torch.get_num_threads(), torch.get_num_interop_threads()


@functools.lru_cache(maxsize=1)
def get_device() -> torch.device:
    """The device chosen by :func:`set_device` (``cpu`` until then)."""
    return torch.device(_device_name)


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype, *, pinned: bool = False) -> torch.Tensor:
    """Allocate an uninitialised tensor on the process device.

    Args:
        shape: tensor shape.
        dtype: element type.
        pinned: allocate in host memory that the transfer engine can register even when the
            compute device is an accelerator (page-locked where the device supports it).
    """
    if pinned:
        dev = get_device()
        pin = dev.type == "cuda"
        return torch.empty(tuple(shape), dtype=dtype, device="cpu", pin_memory=pin)
    return torch.empty(tuple(shape), dtype=dtype, device=get_device())


def synchronize() -> None:
    """Wait for queued device work (no-op on CPU)."""
    dev = get_device()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "npu":
        torch.npu.synchronize()  # type: ignore[attr-defined]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` → ``torch.float32``. Raises ``KeyError`` for an unsupported name."""
    return DTYPES[name.removeprefix("torch.")]
