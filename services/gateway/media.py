"""Image inputs at the gateway: fetch (``data:`` URLs), hash, header-only size check.

The gateway never decodes pixels for the model: it reads the header for the size (so a
decompression bomb is rejected before any decoding), verifies the file's integrity where
the format allows it cheaply (PNG chunk CRCs), hashes the raw bytes (``mm_hash`` = sha256),
and forwards the bytes unchanged to an encoder.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image


class MediaError(ValueError):
    """The media part is unusable; the message is safe to show to the client (HTTP 400)."""


@dataclass(frozen=True)
class ImageInput:
    """One image of a request.

    Attributes:
        data: the encoded file exactly as the client sent it.
        mm_hash: sha256 hex digest of ``data``.
        width, height: pixels, from the header.
    """

    data: bytes
    mm_hash: str
    width: int
    height: int


def load_image_url(url: str, max_pixels: int) -> ImageInput:
    """Resolve an ``image_url`` to bytes and check them.

    Args:
        url: ``data:image/...;base64,...``.
        max_pixels: largest accepted ``width * height``.

    Raises:
        MediaError: unsupported URL scheme, bad base64, not an image, truncated, or too large.
    """
    if not url.startswith("data:"):
        raise MediaError("only data: URLs are accepted for image_url (base64-encoded image bytes)")
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise MediaError("image_url data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"image_url is not valid base64: {exc}") from None
    return check_image_bytes(data, max_pixels)


def check_image_bytes(data: bytes, max_pixels: int) -> ImageInput:
    """Header-only validation of an encoded image. Raises :class:`MediaError`."""
    if not data:
        raise MediaError("image_url holds no data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise MediaError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
            img.verify()  # integrity without decoding (PNG: chunk CRCs, truncation)
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"image_url is not a decodable image: {exc}") from None
    if width < 1 or height < 1:
        raise MediaError("image has no pixels")
    return ImageInput(data, hashlib.sha256(data).hexdigest(), width, height)
