"""Test helpers around the tiny model: build once per session, HF reference inputs, test photos.

``build_tiny_model`` is what ``tests/conftest.py``'s ``tiny_model`` fixture calls. The helpers
below give tests an *independent* Hugging Face reference path (placeholder expansion by
``Qwen2VLProcessor`` logic, ``model.generate``) to compare the adapter against.
"""

from __future__ import annotations

import os
from pathlib import Path

from epd.models.hf_reference import hf_inputs, hf_processor  # noqa: F401  (re-exported for tests)

_built: Path | None = None


def build_tiny_model(tmp_path_factory) -> Path:
    """The ``tiny`` preset (seed 0), built once per session; ``EPD_TEST_MODEL`` overrides the path."""
    global _built
    override = os.environ.get("EPD_TEST_MODEL")
    if override:
        return Path(override)
    if _built is None:
        from epd.models.build import build_model

        _built = build_model("tiny", tmp_path_factory.mktemp("tiny_model"), seed=0)
    return _built


def sample_photos():
    """Real photographs from ``skimage.data`` as RGB PIL images: astronaut 448x448, chelsea, coffee."""
    from PIL import Image
    from skimage import data

    return {
        "astronaut": Image.fromarray(data.astronaut()).resize((448, 448)),
        "chelsea": Image.fromarray(data.chelsea()),
        "coffee": Image.fromarray(data.coffee()),
    }


def adapter_greedy(adapter, input_ids: list[int], images: list, max_new_tokens: int) -> list[int]:
    """Greedy tokens through the adapter seam: encode → prefill → make_cache → decode_step loop."""
    encoded = adapter.encode(images)
    out = adapter.prefill(input_ids, [f for f, _ in encoded], [g for _, g in encoded])
    cache = adapter.make_cache(out.kv)
    past_len = len(input_ids)
    tokens = [int(out.logits.argmax())]
    while tokens[-1] not in adapter.eos_token_ids and len(tokens) < max_new_tokens:
        logits = adapter.decode_step(tokens[-1], cache, past_len, out.rope_delta)
        past_len += 1
        tokens.append(int(logits.argmax()))
    return tokens


class HfReference:
    """The correctness bar: greedy ids of HF ``Qwen2VLForConditionalGeneration.generate(do_sample=False)``.

    One model per test session (``tests/conftest.py``'s ``hf_reference`` fixture); results are
    cached per (images' pixels, text or prompt ids, ``max_new_tokens``).

    Attributes:
        model: the HF model (eval mode, the checkpoint's dtype).
        processor: the image-only ``Qwen2VLProcessor`` (:func:`hf_processor`).
    """

    def __init__(self, model_dir: Path) -> None:
        from transformers import Qwen2VLForConditionalGeneration

        self.model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
        self.processor = hf_processor(model_dir)
        self._cache: dict[tuple, tuple[list[int], list[int]]] = {}

    @property
    def config(self):
        return self.model.config

    def inputs(self, images: list, text: str):
        """HF model inputs (``input_ids``, ``pixel_values``, ``image_grid_thw``…) of one user turn."""
        return hf_inputs(self.processor, images, text)

    def greedy(self, images: list, text: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
        """``(prompt ids, generated ids)`` for a chat turn with ``images`` (PIL, in order) then ``text``."""
        import hashlib

        key = (tuple(hashlib.sha256(im.tobytes()).hexdigest() + str(im.size) + im.mode for im in images), text,
               max_new_tokens)
        if key not in self._cache:
            inputs = self.inputs(images, text)
            prompt = inputs["input_ids"][0].tolist()
            self._cache[key] = (prompt, self._generate(inputs, len(prompt), max_new_tokens))
        return self._cache[key]

    def greedy_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Generated ids for a raw (untemplated, text-only) prompt."""
        import torch

        key = ("ids", tuple(prompt_ids), max_new_tokens)
        if key not in self._cache:
            inputs = {"input_ids": torch.tensor([prompt_ids])}
            self._cache[key] = (list(prompt_ids), self._generate(inputs, len(prompt_ids), max_new_tokens))
        return self._cache[key][1]

    def _generate(self, inputs, prompt_len: int, max_new_tokens: int) -> list[int]:
        import torch

        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        return out[0, prompt_len:].tolist()
