"""Image inputs at the gateway: fetch, hash, header-only size check.

Sources of an ``image_url``:

- ``data:image/...;base64,...`` — always accepted (bounded by the body limit);
- ``file:///abs/path`` or ``/abs/path`` — only under ``EPD_ALLOWED_MEDIA_DIR`` (after resolving
  symlinks and ``..``), at most ``EPD_MAX_IMAGE_MB``;
- ``http(s)://`` — only when ``EPD_ALLOW_REMOTE_MEDIA`` is set, downloaded with the aiohttp
  client within ``EPD_MEDIA_FETCH_TIMEOUT_S`` and ``EPD_MAX_IMAGE_MB`` (the download stops
  as soon as the limit is passed).

The gateway never decodes pixels for the model: it reads the header for the size (so a
decompression bomb is rejected before any decoding), verifies the file's integrity where
the format allows it cheaply (PNG chunk CRCs), hashes the raw bytes (``mm_hash`` = sha256),
and forwards the bytes unchanged to an encoder.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

import aiohttp
from PIL import Image

from services.gateway.prompt import ImageInput


class MediaError(ValueError):
    """The media part is unusable; the message is safe to show to the client (HTTP 400)."""


def decode_data_url(url: str) -> bytes:
    """Bytes of a base64 ``data:`` URL. Raises :class:`MediaError`."""
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise MediaError("image_url data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"image_url is not valid base64: {exc}") from None


def load_image_url(url: str, max_pixels: int) -> ImageInput:
    """Check a ``data:`` URL image synchronously (no file or network access).

    Raises:
        MediaError: not a data: URL, bad base64, not an image, truncated, or too large.
    """
    if not url.startswith("data:"):
        raise MediaError("only data: URLs are accepted here (base64-encoded image bytes)")
    return check_image_bytes(decode_data_url(url), max_pixels)


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


class MediaFetcher:
    """Resolves ``image_url`` values to checked :class:`ImageInput` objects.

    Args:
        max_pixels: largest accepted ``width * height`` (``EPD_MAX_IMAGE_PIXELS``).
        allowed_dir: local files are accepted only under this (resolved) directory; ``None``
            refuses every local path.
        allow_remote: accept ``http(s)`` URLs.
        max_bytes: largest local or remote file.
        timeout_s: deadline of one remote download (connect + body).
    """

    def __init__(self, max_pixels: int, allowed_dir: Path | None = None, allow_remote: bool = False,
                 max_bytes: int = 20 << 20, timeout_s: float = 10.0) -> None:
        self.max_pixels = max_pixels
        self.allowed_dir = allowed_dir.resolve() if allowed_dir is not None else None
        self.allow_remote = allow_remote
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def load(self, url: str) -> ImageInput:
        """Fetch and check one image. Raises :class:`MediaError` (the client's fault: HTTP 400)."""
        loop = asyncio.get_running_loop()
        if url.startswith("data:"):
            data = decode_data_url(url)
        elif url.startswith(("http://", "https://")):
            data = await self._fetch_remote(url)
        elif url.startswith("file://") or url.startswith("/"):
            data = await loop.run_in_executor(None, self._read_local, url)
        else:
            raise MediaError("image_url must be a data: URL, a file:// URL or absolute path "
                             "(under EPD_ALLOWED_MEDIA_DIR) or an http(s) URL (with EPD_ALLOW_REMOTE_MEDIA)")
        return await loop.run_in_executor(None, check_image_bytes, data, self.max_pixels)

    def _read_local(self, url: str) -> bytes:
        if self.allowed_dir is None:
            raise MediaError("local image files are not accepted (the server has no EPD_ALLOWED_MEDIA_DIR)")
        raw = unquote(urlparse(url).path) if url.startswith("file://") else url
        try:
            path = Path(raw).resolve(strict=True)
        except (OSError, RuntimeError):
            raise MediaError("image file not found") from None
        if not path.is_relative_to(self.allowed_dir) or not path.is_file():
            raise MediaError("image file is outside the allowed media directory")
        if path.stat().st_size > self.max_bytes:
            raise MediaError(f"image file is larger than {self.max_bytes} bytes")
        return path.read_bytes()

    async def _fetch_remote(self, url: str) -> bytes:
        if not self.allow_remote:
            raise MediaError("remote image URLs are not accepted (the server has no EPD_ALLOW_REMOTE_MEDIA)")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:
            async with self._session.get(url, max_redirects=3) as resp:
                if resp.status != 200:
                    raise MediaError(f"fetching the image returned HTTP {resp.status}")
                if (resp.content_length or 0) > self.max_bytes:
                    raise MediaError(f"remote image is larger than {self.max_bytes} bytes")
                buf = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    buf += chunk
                    if len(buf) > self.max_bytes:
                        raise MediaError(f"remote image is larger than {self.max_bytes} bytes")
                return bytes(buf)
        except TimeoutError:
            raise MediaError(f"fetching the image took longer than {self.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise MediaError(f"cannot fetch the image: {exc.__class__.__name__}") from None
