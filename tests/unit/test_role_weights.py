"""Per-role weights: the encoder adapter holds the vision tower only, prefill/decode the LM only.

Each partial adapter holds bit-for-bit the tensors ``from_pretrained`` loads for its part and
computes bit-for-bit what the full adapter does (float32); sharded checkpoints keyed by module
names and tied embeddings load too; a method needing a missing part names it.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from epd.models.qwen2_runner import Qwen2VLRunner
from epd.models.qwen2_vl import LANGUAGE, VISION, PartNotLoadedError, Qwen2VLAdapter, role_parts
from epd.models.weights import INDEX_FILE, SINGLE_FILE, MissingPart
from tests.model_fixtures import adapter_greedy, sample_photos

LM_PREFIXES = ("model.language_model.", "lm_head.")
VISION_PREFIX = "model.visual."


@pytest.fixture(scope="module")
def full(tiny_model):
    return Qwen2VLAdapter.load(tiny_model)


@pytest.fixture(scope="module")
def vision(tiny_model):
    return Qwen2VLAdapter.load(tiny_model, parts=role_parts("encoder"))


@pytest.fixture(scope="module")
def language(tiny_model):
    return Qwen2VLAdapter.load(tiny_model, parts=role_parts("prefill"))


@pytest.fixture(scope="module")
def photos():
    return sample_photos()


def _tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _assert_same_tensors(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(ref)
    for name, t in ours.items():
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), name


def _hf(model_dir, dtype=torch.float32):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()


def test_role_parts():
    assert role_parts("encoder") == {VISION}
    assert role_parts("prefill") == role_parts("decode") == role_parts("prefill", "decode") == {LANGUAGE}
    assert role_parts("encoder", "prefill") == role_parts("encoder", "prefill", "decode") == {VISION, LANGUAGE}
    with pytest.raises(ValueError, match="gateway"):
        role_parts("gateway")
    with pytest.raises(ValueError):
        role_parts()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_each_part_holds_what_from_pretrained_loads(tiny_model, dtype):
    ref = _tensors(_hf(tiny_model, dtype))
    for parts, prefixes in (
        ({VISION}, (VISION_PREFIX,)),
        ({LANGUAGE}, LM_PREFIXES),
        ({VISION, LANGUAGE}, (VISION_PREFIX, *LM_PREFIXES)),
    ):
        adapter = Qwen2VLAdapter.load(tiny_model, dtype=dtype, parts=parts)
        assert adapter.parts == parts and adapter.dtype == dtype
        _assert_same_tensors(_tensors(adapter.model), {n: t for n, t in ref.items() if n.startswith(prefixes)})


def test_encoder_holds_no_language_weights_and_prefill_no_vision(vision, language, full):
    def names(adapter):
        return [n for n, _ in adapter.model.named_parameters()]

    assert names(vision) and all(n.startswith(VISION_PREFIX) for n in names(vision))
    assert names(language) and all(n.startswith(LM_PREFIXES) for n in names(language))
    assert isinstance(vision.model.model.language_model, MissingPart) and isinstance(vision.model.lm_head, MissingPart)
    assert isinstance(language.model.model.visual, MissingPart)

    def nbytes(adapter):
        return sum(p.numel() * p.element_size() for p in adapter.model.parameters())

    assert nbytes(vision) + nbytes(language) == nbytes(full)
    # the geometry services size buffers with is there whatever the parts
    geometry = ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size", "image_token_id")
    for attr in (*geometry, "eos_token_ids"):
        assert getattr(vision, attr) == getattr(language, attr) == getattr(full, attr)


def test_partial_adapters_compute_what_the_full_one_does(vision, language, full, photos):
    images = [photos["astronaut"], photos["chelsea"]]
    encoded = vision.encode(images)
    for (f, g), (rf, rg) in zip(encoded, full.encode(images), strict=True):
        assert g == rg and torch.equal(f, rf)

    pad = full.image_token_id
    runs = [[pad] * f.shape[0] for f, _ in encoded]
    prompt = [5, 6, 7, *runs[0], 8, 9, *runs[1], 10, 11, 12]
    feats, grids = [f for f, _ in encoded], [g for _, g in encoded]
    ours, ref = language.prefill(prompt, feats, grids), full.prefill(prompt, feats, grids)
    assert torch.equal(ours.logits, ref.logits) and ours.rope_delta == ref.rope_delta
    assert all(torch.equal(a, b) for pair in zip(ours.kv, ref.kv, strict=True) for a, b in zip(*pair, strict=True))

    cache, ref_cache = language.make_cache(ours.kv), full.make_cache(ref.kv)
    for step in range(4):
        past = len(prompt) + step
        assert torch.equal(language.decode_step(7 + step, cache, past, ours.rope_delta),
                           full.decode_step(7 + step, ref_cache, past, ref.rope_delta))  # fmt: skip

    # the serving engine's runner over a language-only adapter
    embeds, positions, _ = language.prompt_inputs(prompt, feats, grids)
    assert torch.equal(Qwen2VLRunner(language).prefill(embeds, positions, [len(prompt)]),
                       Qwen2VLRunner(full).prefill(embeds, positions, [len(prompt)]))  # fmt: skip


def test_split_greedy_matches_hf_generate(hf_reference, vision, language, photos):
    """E with vision only → P/D with the LM only equals ``generate()`` token for token."""
    images = [photos["coffee"]]
    prompt, expected = hf_reference.greedy(images, "Describe the picture.", 12)
    split = SimpleNamespace(
        encode=vision.encode, prefill=language.prefill, make_cache=language.make_cache,
        decode_step=language.decode_step, eos_token_ids=language.eos_token_ids,
    )  # fmt: skip
    assert adapter_greedy(split, prompt, images, 12) == expected


def test_missing_part_is_named(vision, language, photos):
    with pytest.raises(PartNotLoadedError, match="encode needs the 'vision' weights.*loaded only language"):
        language.encode([photos["astronaut"]])
    with pytest.raises(PartNotLoadedError, match="prefill needs the 'language' weights"):
        vision.prefill([1, 2, 3], [], [])
    with pytest.raises(PartNotLoadedError, match="decode_step needs the 'language' weights"):
        vision.decode_step(1, vision.make_cache([]), 0, 0)
    with pytest.raises(AttributeError, match="'language' weights were not loaded"):
        Qwen2VLRunner(vision)
    with pytest.raises(PartNotLoadedError, match="'vision' weights were not loaded"):
        language.model.model.visual(torch.zeros(1))


def _copy_side_files(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.name != SINGLE_FILE:
            shutil.copy(f, dst / f.name)


def _read_all(model_dir) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / SINGLE_FILE, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_sharded_checkpoint_keyed_by_module_names(tiny_model, tmp_path, full):
    """Three shards + index, keys as module names (``model.visual.*``, ``model.language_model.*``)
    and a stale per-layer ``rotary_emb.inv_freq`` (old checkpoints saved it; ignored)."""
    renamed = {}
    for key, t in _read_all(tiny_model).items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key.removeprefix("model.")
        renamed[key] = t
    renamed["model.language_model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    out = tmp_path / "sharded"
    _copy_side_files(tiny_model, out)
    weight_map = {}
    names = sorted(renamed)
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = names[i::3]
        save_file({n: renamed[n].contiguous() for n in part}, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    ref = _tensors(full.model)
    for parts, prefixes in (({VISION}, (VISION_PREFIX,)), ({LANGUAGE}, LM_PREFIXES)):
        adapter = Qwen2VLAdapter.load(out, parts=parts)
        _assert_same_tensors(_tensors(adapter.model), {n: t for n, t in ref.items() if n.startswith(prefixes)})


def test_tied_embeddings(tiny_model, tmp_path):
    """``tie_word_embeddings`` (as Qwen2-VL-2B): no ``lm_head.weight`` in the file; the head shares
    the embedding matrix, as ``from_pretrained`` does."""
    out = tmp_path / "tied"
    _copy_side_files(tiny_model, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = cfg["text_config"]["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = {k: t for k, t in _read_all(tiny_model).items() if k != "lm_head.weight"}
    save_file(tensors, out / SINGLE_FILE, metadata={"format": "pt"})

    adapter = Qwen2VLAdapter.load(out, parts={LANGUAGE})
    embed = adapter.model.model.language_model.embed_tokens.weight
    assert adapter.model.lm_head.weight is embed
    ref = _hf(out)
    assert torch.equal(ref.lm_head.weight, embed)
    prompt = list(range(20, 40))
    assert torch.equal(adapter.prefill(prompt, [], []).logits, Qwen2VLAdapter.load(out).prefill(prompt, [], []).logits)


def test_load_errors(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="subset"):
        Qwen2VLAdapter.load(tiny_model, parts={"audio"})
    with pytest.raises(ValueError, match="subset"):
        Qwen2VLAdapter.load(tiny_model, parts=())
    empty = tmp_path / "no_weights"
    _copy_side_files(tiny_model, empty)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Qwen2VLAdapter.load(empty, parts={VISION})
    # a vision tensor missing: the vision load names it, the language load does not need it
    broken = tmp_path / "broken"
    _copy_side_files(tiny_model, broken)
    tensors = {k: t for k, t in _read_all(tiny_model).items() if k != "visual.merger.mlp.0.weight"}
    save_file(tensors, broken / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.visual: 1 tensors missing \['merger\.mlp\.0\.weight'\]"):
        Qwen2VLAdapter.load(broken, parts={VISION})
    assert Qwen2VLAdapter.load(broken, parts={LANGUAGE}).parts == {LANGUAGE}


def test_colocated_host_loads_the_union_once(tiny_model):
    """``services.host``: EP shares one adapter with vision + language, PD one with the LM only."""
    from services.host import _PROCS, _shared_adapter

    def classes(roles):
        import importlib

        return [getattr(importlib.import_module(_PROCS[r][1]), _PROCS[r][2]) for r in roles]

    cfg = SimpleNamespace(model=tiny_model, dtype="float32", batch_invariant=False)
    assert _shared_adapter(cfg, ("encoder", "prefill"), classes(("encoder", "prefill"))).parts == {VISION, LANGUAGE}
    assert _shared_adapter(cfg, ("prefill", "decode"), classes(("prefill", "decode"))).parts == {LANGUAGE}
    assert _shared_adapter(cfg, ("decode",), classes(("decode",))) is None
