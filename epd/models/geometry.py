"""Placeholder-token math for Qwen2-VL images, without loading a model (DESIGN §7).

The gateway must know how many ``<|image_pad|>`` tokens an image expands to before any
encoder has seen it (it builds the prompt and picks instances from that count). This module
reads only ``preprocessor_config.json`` and reproduces the resize rule of
``transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize`` and the grid of
``Qwen2VLImageProcessorPil._preprocess``: the image is resized so both sides are multiples of
``patch_size * merge_size`` with the pixel count inside ``[min_pixels, max_pixels]``, cut into
``patch_size`` patches (grid ``(1, h, w)`` for a still image), and every ``merge_size x merge_size``
block of patches becomes one LLM token (Qwen2-VL paper, arXiv 2409.12191 §2.1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

# Defaults of Qwen2VLImageProcessor(Pil) when the config omits a key.
_DEFAULT_MIN_PIXELS = 56 * 56
_DEFAULT_MAX_PIXELS = 28 * 28 * 1280
_MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target ``(height, width)`` in pixels, as HF ``qwen2_vl.image_processing_pil_qwen2_vl.smart_resize``.

    Both sides become multiples of ``factor``, the area lands in ``[min_pixels, max_pixels]``
    and the aspect ratio is kept as closely as possible.

    Raises:
        ValueError: a side is not positive, or the aspect ratio exceeds 200 (HF rejects those too).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {_MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ImageGeometry:
    """Image-processor geometry of one checkpoint: pure arithmetic, no weights, no torch.

    Attributes:
        patch_size: ViT patch side in pixels (14 for Qwen2-VL).
        merge_size: side of the patch block merged into one LLM token (2).
        temporal_patch_size: frames per temporal patch (2; a still image is repeated).
        min_pixels / max_pixels: bounds on the resized image area in pixels.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = _DEFAULT_MIN_PIXELS
    max_pixels: int = _DEFAULT_MAX_PIXELS

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ImageGeometry:
        """Read ``model_dir/preprocessor_config.json`` the way ``Qwen2VLImageProcessorPil.__init__`` does.

        Top-level ``min_pixels``/``max_pixels`` win over ``size.shortest_edge``/``size.longest_edge``
        (and the older ``size.min_pixels``/``size.max_pixels``); absent keys take HF's defaults.

        Raises:
            FileNotFoundError: no ``preprocessor_config.json`` in ``model_dir``.
            ValueError: the file is not a JSON object.
        """
        path = Path(model_dir) / "preprocessor_config.json"
        cfg = json.loads(path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: expected a JSON object")
        size = cfg.get("size") or {}
        min_pixels = cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        max_pixels = cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        return cls(
            patch_size=int(cfg.get("patch_size", 14)),
            merge_size=int(cfg.get("merge_size", 2)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            min_pixels=int(min_pixels or _DEFAULT_MIN_PIXELS),
            max_pixels=int(max_pixels or _DEFAULT_MAX_PIXELS),
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` in pixels the processor resizes an image of this size to.

        Raises:
            ValueError: as :func:`smart_resize`.
        """
        h, w = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        return w, h

    def num_image_tokens(self, width: int, height: int) -> tuple[int, tuple[int, int, int]]:
        """Placeholder count and ``grid_thw`` for a still image of ``width x height`` pixels.

        Returns:
            ``(tokens, (t, h, w))``: ``(t, h, w)`` is the patch grid the image processor emits
            (``image_grid_thw``; ``t == 1``), ``tokens == t * h * w // merge_size**2`` is the number
            of ``<|image_pad|>`` tokens and of feature rows the vision tower produces.

        Raises:
            ValueError: as :func:`smart_resize`.
        """
        w_px, h_px = self.resized_size(width, height)
        grid = (1, h_px // self.patch_size, w_px // self.patch_size)
        return grid[0] * grid[1] * grid[2] // (self.merge_size**2), grid
