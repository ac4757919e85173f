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
