"""Offline model builder: determinism, loadability with plain HF classes, tokenizer, geometry."""

from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image

from epd.models.build import (
    _PRETOKENIZE_REGEX,
    CHAT_TEMPLATE,
    PRESETS,
    SPECIAL_TOKENS,
    build_model,
    make_config,
    train_tokenizer,
)
from epd.models.geometry import ImageGeometry, smart_resize


def _weights_sha(model_dir) -> dict[str, str]:
    files = sorted(model_dir.glob("*.safetensors"))
    assert files
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_other_seed_differs(tmp_path):
    first = build_model("tiny", tmp_path / "first", seed=0)
    again = build_model("tiny", tmp_path / "again", seed=0)
    other = build_model("tiny", tmp_path / "other", seed=1)
    assert _weights_sha(again) == _weights_sha(first)
    assert _weights_sha(other) != _weights_sha(first)
    assert (again / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_pretokenizer_regex_is_qwen2s():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert _PRETOKENIZE_REGEX == PRETOKENIZE_REGEX


def test_tiny_param_count(tiny_model):
    info = json.loads((tiny_model / "build_info.json").read_text())
    assert 8e6 < info["params"] < 12e6


def test_unknown_preset_raises(tmp_path):
    with pytest.raises(KeyError, match="unknown preset"):
        build_model("huge", tmp_path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_configs_are_consistent(name):
    spec = PRESETS[name]
    config = make_config(spec, train_tokenizer(spec.bpe_vocab))
    assert sum(config.text_config.rope_parameters["mrope_section"]) * 2 == spec.head_dim
    assert config.vision_config.hidden_size == config.text_config.hidden_size


def test_2b_preset_has_qwen2_vl_2b_dimensions():
    spec = PRESETS["2b"]
    assert (spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.intermediate) == (1536, 28, 12, 2, 8960)
    assert (spec.vision_depth, spec.vision_embed) == (32, 1280)


def test_loads_with_plain_hf_classes(tiny_model):
    from transformers import AutoTokenizer, GenerationConfig, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = model.config
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    gen = GenerationConfig.from_pretrained(tiny_model)
    assert gen.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    # init std 0.1 (DESIGN §8), not HF's default 0.02
    assert 0.09 < float(model.lm_head.weight.detach().std()) < 0.11


def test_tokenizer_special_tokens_and_byte_level_round_trip(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for t in SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    text = "Grüße aus Köln — 東京 🚲 costs £3.50!\n\tnew line"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert 3500 < len(tok) < 4500


def test_chat_template_renders_qwen2_vl_layout(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    default_system = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert default_system == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )


SIZES = [(448, 448), (640, 480), (480, 640), (1, 1), (3, 5), (20, 900), (1000, 40), (2048, 1536), (4000, 3000)]


@pytest.mark.parametrize("width,height", SIZES)
def test_geometry_matches_image_processor(tiny_model, width, height):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_model)
    geometry = ImageGeometry.from_model_dir(tiny_model)
    image = Image.new("RGB", (width, height), (120, 30, 200))
    out = processor(images=[image], return_tensors="pt")
    grid = tuple(int(x) for x in out["image_grid_thw"][0])
    tokens, geo_grid = geometry.num_image_tokens(width, height)
    assert geo_grid == grid
    assert tokens == out["pixel_values"].shape[0] // 4


def test_geometry_reads_real_checkpoint_layouts(tmp_path):
    # Qwen2-VL-2B-Instruct style: top-level min/max_pixels.
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2})
    )
    assert ImageGeometry.from_model_dir(tmp_path).num_image_tokens(448, 448) == (256, (1, 32, 32))
    # transformers >= 4.5x style: size dict only.
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 3136, "longest_edge": 200704}})
    )
    geometry = ImageGeometry.from_model_dir(tmp_path)
    assert (geometry.min_pixels, geometry.max_pixels) == (3136, 200704)
    assert geometry.num_image_tokens(896, 896) == (256, (1, 32, 32))


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 500, 28, 3136, 200704)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 5, 28, 3136, 200704)
