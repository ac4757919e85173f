"""Offline builder for randomly initialised Qwen2-VL checkpoints (DESIGN §8).

No weights can be downloaded here, so the project builds its own models of the real
architecture: a byte-level BPE tokenizer trained with ``tokenizers`` on the prose shipped in
``epd/models/corpus/``, a ``Qwen2VLConfig`` sized by a preset, a seeded random init, and a
directory laid out exactly like a Hugging Face Qwen2-VL checkpoint::

    config.json  generation_config.json  model.safetensors
    tokenizer.json  tokenizer_config.json  chat_template.jinja  preprocessor_config.json
    build_info.json   (ours: preset, seed, parameter count)

Everything downstream loads it with plain ``from_pretrained(model_dir)``, so the same code
serves a real checkpoint directory.

CLI: ``python -m epd.models.build --preset tiny --out /tmp/tiny [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

log = logging.getLogger(__name__)

CORPUS_DIR = Path(__file__).parent / "corpus"

#: Qwen2-VL's special tokens, in the order the real vocabulary lists them (ids follow the BPE vocab).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Qwen2's pre-tokenizer split (same pattern as ``transformers.Qwen2Tokenizer``), so our
#: tokenizer behaves like the real one on whitespace, digits and punctuation.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Chat template in Qwen2-VL's ChatML layout: ``<|im_start|>role\n...<|im_end|>\n`` per message,
#: a default system message when the conversation has none, image parts as
#: ``<|vision_start|><|image_pad|><|vision_end|>`` (one pad per image; the caller expands it to
#: the image's token count), and ``<|im_start|>assistant\n`` for ``add_generation_prompt``.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    """Model dimensions for one build preset. ``mrope_section`` must sum to ``head_dim // 2``."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_depth: int
    vision_embed: int
    vision_heads: int
    mrope_section: tuple[int, int, int]
    min_pixels: int
    max_pixels: int
    tie_embeddings: bool
    save_dtype: torch.dtype
    bpe_vocab: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, Preset] = {
    # ~10 M params; 448x448 -> 16x16 merged tokens (max_pixels caps larger images at 256 tokens).
    "tiny": Preset(
        hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768,
        vision_depth=4, vision_embed=256, vision_heads=4, mrope_section=(8, 12, 12),
        min_pixels=56 * 56, max_pixels=448 * 448, tie_embeddings=False, save_dtype=torch.float32,
    ),
    # ~180 M params for CPU benchmarks; up to 576 image tokens.
    "mid": Preset(
        hidden=768, layers=12, heads=12, kv_heads=2, intermediate=2048,
        vision_depth=12, vision_embed=768, vision_heads=12, mrope_section=(8, 12, 12),
        min_pixels=56 * 56, max_pixels=28 * 28 * 576, tie_embeddings=False, save_dtype=torch.float32,
    ),
    # Qwen2-VL-2B-Instruct dimensions (vocab is ours); saved in bf16 like the real checkpoint.
    "2b": Preset(
        hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960,
        vision_depth=32, vision_embed=1280, vision_heads=16, mrope_section=(16, 24, 24),
        min_pixels=56 * 56, max_pixels=28 * 28 * 1280, tie_embeddings=True, save_dtype=torch.bfloat16,
    ),
}  # fmt: skip


def train_tokenizer(vocab_size: int = 4096, corpus_dir: Path = CORPUS_DIR) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``corpus_dir/*.txt`` and append Qwen2-VL's special tokens.

    The pipeline (NFC, Qwen2 split regex, byte-level without prefix space, byte-level decoder)
    matches ``transformers.Qwen2Tokenizer``; the 256-byte initial alphabet means any UTF-8 text
    encodes. Training is deterministic for a given corpus and ``vocab_size``.

    Args:
        vocab_size: BPE vocabulary size before the special tokens (the corpus caps what is reachable).
        corpus_dir: directory of UTF-8 ``.txt`` files.

    Raises:
        FileNotFoundError: ``corpus_dir`` holds no ``.txt`` file.
    """
    files = sorted(str(p) for p in corpus_dir.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no corpus .txt files under {corpus_dir}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train(files, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _save_tokenizer(tok: Tokenizer, out_dir: Path):
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    hf_tok = Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def make_config(preset: Preset, tok: Tokenizer):
    """Build the ``transformers.Qwen2VLConfig`` for ``preset`` with ids taken from ``tok``.

    ``initializer_range=0.1`` (DESIGN §8: 0.02 makes greedy output repeat one token).
    """
    from transformers import Qwen2VLConfig

    if sum(preset.mrope_section) * 2 != preset.head_dim:
        raise ValueError(f"mrope_section {preset.mrope_section} must sum to head_dim/2 = {preset.head_dim // 2}")
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": preset.hidden,
        "intermediate_size": preset.intermediate,
        "num_hidden_layers": preset.layers,
        "num_attention_heads": preset.heads,
        "num_key_value_heads": preset.kv_heads,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.1,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": list(preset.mrope_section),
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": preset.tie_embeddings,
    }
    vision_config = {
        "depth": preset.vision_depth,
        "embed_dim": preset.vision_embed,
        "hidden_size": preset.hidden,
        "num_heads": preset.vision_heads,
        "mlp_ratio": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "initializer_range": 0.1,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=preset.tie_embeddings,
        initializer_range=0.1,
    )


def _save_preprocessor_config(preset: Preset, out_dir: Path) -> None:
    # The real checkpoint's layout and class name: AutoImageProcessor resolves it to the PIL
    # backend (Qwen2VLImageProcessorPil) when torchvision is missing, the torchvision one otherwise.
    cfg = {
        "min_pixels": preset.min_pixels,
        "max_pixels": preset.max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def build_model(preset: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a randomly initialised Qwen2-VL checkpoint directory (DESIGN §8).

    Weights follow ``transformers.Qwen2VLForConditionalGeneration``'s own ``_init_weights``
    under ``torch.manual_seed(seed)``; the same preset and seed give byte-identical
    safetensors. The parameter count is logged and written to ``build_info.json``.

    Args:
        preset: ``tiny`` (~10 M params, tests), ``mid`` (~180 M, CPU benchmarks) or ``2b``
            (Qwen2-VL-2B dimensions, bf16, slow to build: ~9 GB of RAM).
        out_dir: directory to create or overwrite.
        seed: torch RNG seed for the weights.

    Returns:
        ``out_dir``.

    Raises:
        KeyError: unknown preset.
    """
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    tok = train_tokenizer(spec.bpe_vocab)
    _save_tokenizer(tok, out_dir)
    config = make_config(spec, tok)

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.to(spec.save_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    _save_preprocessor_config(spec, out_dir)

    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    info = {"preset": preset, "seed": seed, "params": n_params, "vision_params": n_vision}
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "built %s (seed %d): %.1f M params (vision %.1f M) in %.2f s -> %s",
        preset, seed, n_params / 1e6, n_vision / 1e6, time.perf_counter() - t0, out_dir,
    )  # fmt: skip
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = build_model(args.preset, args.out, args.seed)
    info = json.loads((out / "build_info.json").read_text())
    print(f"{args.preset}: {info['params']:,} params ({info['vision_params']:,} vision) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
