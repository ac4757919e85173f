"""Per-role weights of the Qwen2-VL family (DESIGN §7): which modules each part holds, which
parts each role needs, and the model built with only those parts in memory.

Parts: ``"vision"`` (``model.visual``: patch embedding, ViT blocks, merger) and ``"language"``
(``model.language_model``: embeddings, decoder layers, norm, rotary; and ``lm_head``).
:func:`role_parts` maps roles to parts: the encoder loads vision only, prefill and decode
language only, co-located roles the union. The input stays an HF checkpoint directory (single
or sharded safetensors, hub key layout or module names; ``epd.models.weights``); the
``Qwen2VLForConditionalGeneration`` is built as a meta-device skeleton and only the loaded
parts get memory, the others are :class:`~epd.models.weights.MissingPart` placeholders.
Loaded parts hold bit-for-bit the tensors ``from_pretrained`` would (tests/unit/test_role_weights.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from epd.models.weights import Checkpoint, MissingPart, build_empty

if TYPE_CHECKING:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

VISION = "vision"
LANGUAGE = "language"
ALL_PARTS = frozenset({VISION, LANGUAGE})
#: The parts each role computes with (DESIGN §7).
ROLE_PARTS = {"encoder": frozenset({VISION}), "prefill": frozenset({LANGUAGE}), "decode": frozenset({LANGUAGE})}

#: Checkpoint key -> module name, first match wins (transformers' ``conversion_mapping`` for
#: ``Qwen2VLForConditionalGeneration``): hub checkpoints and transformers 5's ``save_pretrained``
#: write ``visual.*``, ``model.*`` (the LM) and ``lm_head.*``; keys already in module names
#: (``model.visual.*``, ``model.language_model.*``) pass through unchanged.
_KEY_RENAMES = (
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
)
_STALE_KEYS = (r"rotary_emb\.inv_freq$",)  # old checkpoints saved this buffer; transformers skips it too


def role_parts(*roles: str) -> frozenset[str]:
    """The parts (``"vision"``, ``"language"``) that ``roles`` (``encoder``, ``prefill``, ``decode``) need, united.

    Raises:
        ValueError: an unknown role, or no role.
    """
    unknown = [r for r in roles if r not in ROLE_PARTS]
    if unknown or not roles:
        raise ValueError(f"roles {roles!r}: expected one or more of {', '.join(ROLE_PARTS)}")
    return frozenset().union(*(ROLE_PARTS[r] for r in roles))


def _needed_by(part: str) -> list[str]:
    """The roles that load ``part`` (for the error of a checkpoint without it)."""
    return [role for role, parts in ROLE_PARTS.items() if part in parts]


def load_partial_model(
    model_dir: Path, config: Qwen2VLConfig, parts: frozenset[str], dtype: torch.dtype, device: torch.device
) -> tuple[Qwen2VLForConditionalGeneration, int]:
    """``Qwen2VLForConditionalGeneration`` with only ``parts`` materialised on ``device`` in ``dtype``.

    Returns:
        ``(model, bytes of the tensors loaded)``; the parts not loaded are
        :class:`~epd.models.weights.MissingPart` placeholders.

    Raises:
        MissingWeightsError: the checkpoint has no tensor at all of a loaded part (a ConfigError
            naming EPD_MODEL and the roles that need the part).
        ValueError: the checkpoint lacks a tensor of a loaded part (:class:`~epd.models.weights.Checkpoint`).
        RuntimeError: a tensor of the model was left unmaterialised.
    """
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel, Qwen2VLTextModel

    ckpt = Checkpoint(model_dir, _KEY_RENAMES)
    for cfg in (config, config.vision_config, config.text_config):
        cfg.dtype = dtype  # as from_pretrained leaves it: the config names the weights' dtype
    model = build_empty(lambda: Qwen2VLForConditionalGeneration(config), dtype, meta=True)
    text, loaded = config.text_config, 0
    if VISION in parts:
        visual = build_empty(lambda: Qwen2VisionTransformerPretrainedModel(config.vision_config), dtype)
        loaded += ckpt.load_into(visual, "model.visual", device=device, dtype=dtype, ignore=_STALE_KEYS,
                                 part=VISION, needed_by=_needed_by(VISION))
        model.model.visual = visual
    else:
        model.model.visual = MissingPart(VISION, parts)
    if LANGUAGE in parts:
        lm = build_empty(lambda: Qwen2VLTextModel(text), dtype)
        loaded += ckpt.load_into(lm, "model.language_model", device=device, dtype=dtype, ignore=_STALE_KEYS,
                                 part=LANGUAGE, needed_by=_needed_by(LANGUAGE))
        head = build_empty(lambda: torch.nn.Linear(text.hidden_size, text.vocab_size, bias=False), dtype)
        if config.tie_word_embeddings:  # Qwen2-VL-2B: lm_head shares the embedding matrix
            head.weight = lm.embed_tokens.weight
        else:
            loaded += ckpt.load_into(head, "lm_head", device=device, dtype=dtype)
        model.model.language_model, model.lm_head = lm, head
    else:
        model.model.language_model = model.lm_head = MissingPart(LANGUAGE, parts)
    model.to(device)  # the buffers built on the CPU (rotary inv_freq); parameters are there already
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{model_dir}: tensors left unmaterialised: {left[:5]}")
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model, loaded
