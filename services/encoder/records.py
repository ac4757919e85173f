"""Typed records of the encode engine: :class:`EncodeRequest` in, :class:`EncodeOutputs` out.

No protobuf here: ``services/encoder/convert.py`` is the only place both meet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from services.encoder.core import PoolEntry


@dataclass
class ImageInput:
    """One image of a request.

    Attributes:
        index: position of the image in the prompt (0-based).
        mm_hash: sha256 hex of the raw image bytes (the feature-cache key).
        grid_thw: the ``(t, h, w)`` patch grid the gateway computed (batching cost); ``()`` if unknown.
        data: the encoded file (PNG, JPEG…); ``None`` when it did not arrive.
        image: an already decoded RGB image (in-process callers); used instead of ``data``.
    """

    index: int
    mm_hash: str
    grid_thw: tuple[int, ...] = ()
    data: bytes | None = None
    image: Image.Image | None = None

    @property
    def patches(self) -> int:
        """``t * h * w`` (0 when the grid is unknown)."""
        return self.grid_thw[0] * self.grid_thw[1] * self.grid_thw[2] if len(self.grid_thw) == 3 else 0


@dataclass
class EncodeRequest:
    """Images to encode for one request.

    Attributes:
        request_id: unique id.
        images: the images not yet known to be cached, in any order.
        deadline: unix seconds; a queued image past it fails the request (``TIMEOUT``); pool
            entries stay leased (not evictable) until then.
        ctx: the caller's data, returned untouched with every output (the process keeps the
            prefill and gateway addresses here).
    """

    request_id: str
    images: list[ImageInput]
    deadline: float
    ctx: Any = None


@dataclass
class FeaturesOut:
    """One image's features are in the pool (announce them: ``FeaturesReady``).

    Attributes:
        entry: where they lie: ``entry.offset``/``nbytes`` bytes of the pool region,
            ``[num_tokens, hidden]`` of ``entry.dtype``.
        cached: found in the pool, not encoded now.
    """

    request: EncodeRequest
    index: int
    entry: PoolEntry
    cached: bool = False


@dataclass
class EncodeFailure:
    """A failed request.

    Attributes:
        code: ``epd.v1.ErrorCode`` name (``INVALID_REQUEST``, ``TIMEOUT``, ``INTERNAL``,
            ``OUT_OF_CAPACITY``, ``UNAVAILABLE``).
        peer: the lost peer's instance id or address when that caused it, else ``""``.
    """

    request: EncodeRequest
    code: str
    message: str
    peer: str = ""


@dataclass
class EncoderLoad:
    """What the registry publishes for an encoder (exact integers).

    Attributes:
        queued_images: images waiting to be encoded.
        queued_patches: their vision patches (``t * h * w`` summed).
        pool_entries: images in the feature pool.
        pool_used_bytes: bytes of the pool in use.
    """

    queued_images: int = 0
    queued_patches: int = 0
    pool_entries: int = 0
    pool_used_bytes: int = 0

    @property
    def inflight(self) -> int:
        """Work not finished here (a drain waits for 0)."""
        return self.queued_images


@dataclass
class EncodeOutputs:
    """What one :meth:`EncodeEngine.step` produced.

    Attributes:
        evicted: ``mm_hash`` of every pool entry evicted (unpublish them *before* publishing ``ready``).
        ready: features now in the pool, in completion order.
        failed: failed requests.
        busy: images still queued.
        load: the load after the step.
    """

    evicted: list[str] = field(default_factory=list)
    ready: list[FeaturesOut] = field(default_factory=list)
    failed: list[EncodeFailure] = field(default_factory=list)
    busy: bool = False
    load: EncoderLoad = field(default_factory=EncoderLoad)
