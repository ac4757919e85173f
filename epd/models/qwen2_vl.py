"""Qwen2-VL family adapter: the only module that knows the architecture (DESIGN §7).

Services call four operations, each a slice of ``Qwen2VLForConditionalGeneration.forward``
(transformers 5.x) cut at the seams the E/P/D split needs:

* :meth:`Qwen2VLAdapter.encode` — image processor + vision tower + patch merger
  (``Qwen2VLModel.get_image_features``) → per-image features ``[tokens, hidden]``;
* :meth:`Qwen2VLAdapter.prefill` — text embeddings with the features scattered into the
  ``<|image_pad|>`` positions (as ``Qwen2VLModel.forward``), 3-D M-RoPE positions from
  ``Qwen2VLModel.get_rope_index`` (Qwen2-VL paper, arXiv 2409.12191 §2.1 "M-RoPE"), LM forward
  → last-position logits, per-layer KV and the request's ``rope_delta``;
* :meth:`Qwen2VLAdapter.decode_step` — one token at position ``past_len + rope_delta`` on all
  three M-RoPE axes (what ``Qwen2VLModel.compute_3d_position_ids`` does during generation);
* :meth:`Qwen2VLAdapter.make_cache` / :meth:`Qwen2VLAdapter.read_cache` — per-layer
  ``(k, v)`` tensors ↔ the model's ``transformers.DynamicCache``.

Greedy decoding through these equals ``model.generate(do_sample=False)`` token for token
(tests/unit/test_qwen2_vl_adapter.py). The image processor comes from ``AutoImageProcessor``
rather than ``AutoProcessor``: without torchvision the latter fails on Qwen2-VL's video
processor, while the former falls back to ``Qwen2VLImageProcessorPil``.

Per-role weights (DESIGN §7): :meth:`Qwen2VLAdapter.load` takes the ``parts`` to load —
``"vision"`` and/or ``"language"``; :func:`role_parts` maps roles to parts. Which modules a part
holds and how only those are materialised is :mod:`epd.models.qwen2_vl_parts` (re-exported here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from epd.device import get_device
from epd.models.buckets import INVARIANT_ROWS, make_batch_invariant, padded_rows
from epd.models.geometry import ImageGeometry
from epd.models.qwen2_vl_parts import ALL_PARTS, LANGUAGE, VISION, load_partial_model, role_parts
from epd.models.weights import PartNotLoadedError

if TYPE_CHECKING:
    from PIL.Image import Image
    from transformers import DynamicCache

__all__ = [
    "ALL_PARTS", "LANGUAGE", "VISION", "ImageGeometry", "LayerKV", "PartNotLoadedError", "PrefillOutput",
    "Qwen2VLAdapter", "role_parts",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Per-layer KV: ``(k, v)``, each ``[num_kv_heads, seq_len, head_dim]``, adapter dtype, on the device.
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class PrefillOutput:
    """Result of :meth:`Qwen2VLAdapter.prefill` for one request.

    Attributes:
        logits: ``[vocab]`` logits of the last prompt position (adapter dtype).
        kv: one ``(k, v)`` per layer, each ``[num_kv_heads, seq_len, head_dim]``, contiguous.
        rope_delta: M-RoPE offset: a generated token at sequence index ``i`` sits at position
            ``i + rope_delta`` on all three axes (0 for text-only prompts, negative with images).
    """

    logits: torch.Tensor
    kv: list[LayerKV]
    rope_delta: int


class Qwen2VLAdapter:
    """A loaded Qwen2-VL / Qwen2-VL-shaped checkpoint in eval mode, on ``epd.device.get_device()``.

    Build with :meth:`load`. Attributes describe the geometry services size buffers with:
    ``image_token_id``, ``eos_token_ids``, ``num_layers``, ``num_kv_heads``, ``head_dim``,
    ``hidden_size``, ``vocab_size``, ``dtype``, ``device``, ``geometry`` (:class:`ImageGeometry`),
    and ``parts``, the weights it holds (a method needing another part raises
    :class:`~epd.models.weights.PartNotLoadedError`).
    """

    def __init__(
        self,
        model,
        image_processor,
        geometry: ImageGeometry,
        eos_token_ids: tuple[int, ...],
        parts: frozenset[str] = ALL_PARTS,
    ):
        cfg = model.config
        self.parts = parts
        text = cfg.text_config
        self.model = model
        self.image_processor = image_processor
        self.geometry = geometry
        self.eos_token_ids = eos_token_ids
        self.image_token_id: int = cfg.image_token_id
        self.num_layers: int = text.num_hidden_layers
        self.num_kv_heads: int = text.num_key_value_heads
        self.hidden_size: int = text.hidden_size
        self.head_dim: int = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.vocab_size: int = text.vocab_size
        self.merge_size: int = cfg.vision_config.spatial_merge_size
        self.dtype: torch.dtype = model.dtype
        self.device: torch.device = model.device

    @classmethod
    def load(
        cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, parts: Iterable[str] = ALL_PARTS,
        batch_invariant: bool = False,
    ) -> Qwen2VLAdapter:
        """Load the weights of ``parts``, the image processor and token ids from a checkpoint directory.

        Any HF Qwen2-VL directory works (``config.json``, ``model.safetensors`` or a sharded
        ``model.safetensors.index.json``, ``preprocessor_config.json``, optional
        ``generation_config.json``); only the tensors of ``parts`` are read. The image processor
        is ``AutoImageProcessor`` (PIL backend when torchvision is missing). EOS ids come from
        the generation config, else from ``text_config.eos_token_id``.

        Args:
            model_dir: checkpoint directory.
            dtype: parameter and activation dtype (``torch.float32`` default; ``bfloat16`` on GPUs).
            parts: ``"vision"`` (:meth:`encode`) and/or ``"language"`` (:meth:`prompt_inputs`,
                :meth:`prefill`, :meth:`decode_step`, ``Qwen2VLRunner``); see :func:`role_parts`.
                Default: both (the whole model, e.g. for ``generate()``).
            batch_invariant: run every linear layer on fixed 64-row GEMMs where bf16/fp16 on a CPU
                would otherwise round a row by the batch it is in (``EPD_BATCH_INVARIANT``;
                :func:`epd.models.buckets.make_batch_invariant`).

        Raises:
            ValueError: an unknown or empty ``parts``; a checkpoint lacking a tensor of a part.
            FileNotFoundError: no safetensors checkpoint or no ``preprocessor_config.json``.
            OSError: unreadable checkpoint files.
        """
        from transformers import AutoImageProcessor, Qwen2VLConfig

        parts = frozenset(parts)
        if not parts or not parts <= ALL_PARTS:
            raise ValueError(f"parts {sorted(parts)}: expected a non-empty subset of {sorted(ALL_PARTS)}")
        model_dir = Path(model_dir)
        config = Qwen2VLConfig.from_pretrained(model_dir)
        model, nbytes = load_partial_model(model_dir, config, parts, dtype, get_device())
        model.eval().requires_grad_(False)
        if batch_invariant and (n := make_batch_invariant(model, dtype, model.device)):
            log.info("EPD_BATCH_INVARIANT: %d linear layers run on fixed %d-row GEMMs", n, INVARIANT_ROWS)
        image_processor = AutoImageProcessor.from_pretrained(model_dir)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = model.config.text_config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        adapter = cls(model, image_processor, ImageGeometry.from_model_dir(model_dir), eos_ids, parts)
        log.info(
            "loaded %s (%s: %.1f MB): %d layers, %d kv heads x %d, hidden %d, vocab %d, %s on %s, image processor %s",
            model_dir, "+".join(sorted(parts)), nbytes / 2**20, adapter.num_layers, adapter.num_kv_heads,
            adapter.head_dim, adapter.hidden_size, adapter.vocab_size, dtype, adapter.device,
            type(image_processor).__name__,
        )  # fmt: skip
        return adapter

    def require(self, part: str, operation: str) -> None:
        """Raise :class:`PartNotLoadedError` unless ``part`` was loaded; ``operation`` names the caller."""
        if part not in self.parts:
            raise PartNotLoadedError(
                f"{operation} needs the {part!r} weights, but this adapter loaded only "
                f"{', '.join(sorted(self.parts))} (Qwen2VLAdapter.load(parts=...): the encoder role loads "
                f"{VISION!r}, prefill and decode {LANGUAGE!r})"
            )

    # ----------------------------------------------------------------------------- encode

    @torch.no_grad()
    def encode(self, images: list[Image]) -> list[tuple[torch.Tensor, tuple[int, int, int]]]:
        """Image processor + vision tower + merger for a batch of images, in one vision forward.

        Follows ``Qwen2VLModel.get_image_features`` (variable-resolution ViT with per-image
        attention via ``cu_seqlens``, then ``PatchMerger``; Qwen2-VL paper §2.1). In
        bfloat16/float16 on a CPU the batch's patches are padded to a row bucket with one extra
        all-zero image whose features are dropped (:func:`epd.models.buckets.padded_rows`).

        Args:
            images: PIL images, any size with aspect ratio ≤ 200 (converted to RGB).

        Returns:
            One ``(features, (t, h, w))`` per image, in order: ``features`` is
            ``[t*h*w // merge_size**2, hidden_size]`` in the adapter dtype on the device, and
            ``(t, h, w)`` the patch grid (equal to ``geometry.num_image_tokens(*image.size)[1]``).

        Raises:
            ValueError: an image the processor rejects (e.g. aspect ratio > 200).
            PartNotLoadedError: the adapter was loaded without the ``"vision"`` part.
        """
        self.require(VISION, "encode")
        if not images:
            return []
        inputs = self.image_processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        grid_thw = inputs["image_grid_thw"].to(self.device)
        grids = [tuple(int(x) for x in g) for g in grid_thw.tolist()]
        patches = pixel_values.shape[0]
        if (pad := padded_rows(patches, self.dtype, self.device) - patches) > 0:
            # bf16 on CPU: one more "image" of 2 x pad/2 zero patches (its own attention chunk, its
            # features dropped) brings the GEMM rows to a bucket (epd.models.buckets)
            pixel_values = torch.cat([pixel_values, pixel_values.new_zeros(pad, pixel_values.shape[1])])
            grid_thw = torch.cat([grid_thw, grid_thw.new_tensor([[1, 2, pad // 2]])])
        out = self.model.model.get_image_features(pixel_values, image_grid_thw=grid_thw, return_dict=True)
        return [(f.contiguous(), g) for f, g in zip(out.pooler_output[: len(grids)], grids, strict=True)]

    # ----------------------------------------------------------------------------- prefill

    @torch.no_grad()
    def prefill(
        self,
        input_ids: list[int],
        image_features: list[torch.Tensor],
        image_grids: list[tuple[int, int, int]],
    ) -> PrefillOutput:
        """Prompt forward: embeddings + image features, M-RoPE positions, LM with a fresh cache.

        ``input_ids`` must already hold each image's placeholder run expanded (one
        ``<|image_pad|>`` per feature row, images in prompt order, each run delimited by other
        tokens such as ``<|vision_start|>``/``<|vision_end|>``, as ``Qwen2VLProcessor`` produces).

        Args:
            input_ids: prompt token ids, length ``seq_len`` ≥ 1.
            image_features: per image ``[tokens_i, hidden_size]`` (from :meth:`encode`, any device).
            image_grids: per image ``(t, h, w)`` patch grid, same order.

        Returns:
            :class:`PrefillOutput` with ``seq_len`` cached positions per layer.

        Raises:
            ValueError: empty prompt; features/grids count mismatch; a feature's row count differs
                from its grid's token count; the number of ``<|image_pad|>`` tokens differs from
                the total feature rows.
            PartNotLoadedError: the adapter was loaded without the ``"language"`` part.
        """
        embeds, position_ids, rope_delta = self.prompt_inputs(input_ids, image_features, image_grids)
        embeds, position_ids = embeds[None], position_ids[:, None, :]
        cache = self.make_cache([])
        logits = self._forward(embeds, position_ids, cache)
        return PrefillOutput(logits=logits, kv=self.read_cache(cache), rope_delta=rope_delta)

    @torch.no_grad()
    def prompt_inputs(
        self,
        input_ids: list[int],
        image_features: list[torch.Tensor],
        image_grids: list[tuple[int, int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Input embeddings with image features scattered in, and 3-D M-RoPE positions.

        Follows ``Qwen2VLModel.forward``: text embeddings, features ``masked_scatter``-ed into
        the ``<|image_pad|>`` positions in order, positions from ``Qwen2VLModel.get_rope_index``.

        Returns:
            ``(embeds [seq_len, hidden] adapter dtype, positions [3, seq_len] int64, rope_delta)``;
            generated token ``i`` (0-based, after the prompt) sits at ``seq_len + i + rope_delta``.

        Raises:
            ValueError: as :meth:`prefill`.
        """
        self.require(LANGUAGE, "prefill")
        if not input_ids:
            raise ValueError("prefill needs at least one input token")
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        image_mask = ids == self.image_token_id
        self._check_images(int(image_mask.sum()), image_features, image_grids)
        if image_features:
            feats = torch.cat([f.to(self.device, embeds.dtype) for f in image_features])
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(embeds), feats)
            position_ids, deltas = self.model.model.get_rope_index(
                ids,
                mm_token_type_ids=image_mask.int(),
                image_grid_thw=torch.tensor(image_grids, dtype=torch.long, device=self.device),
            )
            rope_delta = int(deltas.reshape(-1)[0])
        else:
            position_ids = torch.arange(len(input_ids), device=self.device).view(1, 1, -1).expand(3, 1, -1)
            rope_delta = 0
        return embeds[0], position_ids[:, 0, :], rope_delta

    def _check_images(
        self, n_placeholders: int, features: list[torch.Tensor], grids: list[tuple[int, int, int]]
    ) -> None:
        if len(features) != len(grids):
            raise ValueError(f"{len(features)} image features but {len(grids)} grids")
        for i, (f, g) in enumerate(zip(features, grids, strict=True)):
            want = g[0] * g[1] * g[2] // self.merge_size**2
            if f.ndim != 2 or f.shape[0] != want or f.shape[1] != self.hidden_size:
                raise ValueError(f"image {i}: features {tuple(f.shape)} do not match grid {g} ({want} tokens)")
        total = sum(f.shape[0] for f in features)
        if n_placeholders != total:
            raise ValueError(f"prompt has {n_placeholders} image placeholder tokens but features have {total} rows")

    # ----------------------------------------------------------------------------- decode

    @torch.no_grad()
    def decode_step(self, token_id: int, kv_cache: DynamicCache, past_len: int, rope_delta: int) -> torch.Tensor:
        """Append one token to ``kv_cache`` (in place) and return the next-token logits.

        The token sits at M-RoPE position ``past_len + rope_delta`` on the temporal, height and
        width axes alike (``Qwen2VLModel.compute_3d_position_ids`` during generation).

        Args:
            token_id: the token to feed (the previous step's choice).
            kv_cache: cache from :meth:`make_cache`, holding exactly ``past_len`` positions.
            past_len: tokens already in the cache (prompt + earlier generated tokens).
            rope_delta: from :class:`PrefillOutput`.

        Returns:
            ``[vocab]`` logits, adapter dtype.

        Raises:
            ValueError: ``kv_cache`` holds a different number of positions than ``past_len``.
            PartNotLoadedError: the adapter was loaded without the ``"language"`` part.
        """
        self.require(LANGUAGE, "decode_step")
        if kv_cache.get_seq_length() != past_len:
            raise ValueError(f"cache holds {kv_cache.get_seq_length()} positions, past_len is {past_len}")
        ids = torch.tensor([[token_id]], dtype=torch.long, device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        position_ids = torch.full((3, 1, 1), past_len + rope_delta, dtype=torch.long, device=self.device)
        return self._forward(embeds, position_ids, kv_cache)

    def _forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        out = self.model.model.language_model(
            inputs_embeds=embeds, position_ids=position_ids, past_key_values=cache, use_cache=True
        )
        return self.model.lm_head(out.last_hidden_state[0, -1])

    # ----------------------------------------------------------------------------- KV cache

    def make_cache(self, kv: list[LayerKV]) -> DynamicCache:
        """Build the model's ``transformers.DynamicCache`` from per-layer ``(k, v)``.

        Args:
            kv: empty (a fresh cache) or one ``(k, v)`` per layer, each
                ``[num_kv_heads, seq_len, head_dim]``; copied into the cache (moved to the
                adapter's device and dtype if needed).

        Raises:
            ValueError: wrong number of layers or a wrong per-layer shape.
        """
        from transformers import DynamicCache

        if not kv:
            return DynamicCache(config=self.model.config)
        if len(kv) != self.num_layers:
            raise ValueError(f"expected KV for {self.num_layers} layers, got {len(kv)}")
        for i, (k, v) in enumerate(kv):
            if k.shape != v.shape or k.ndim != 3 or (k.shape[0], k.shape[2]) != (self.num_kv_heads, self.head_dim):
                raise ValueError(
                    f"layer {i}: k {tuple(k.shape)} / v {tuple(v.shape)}, expected "
                    f"[{self.num_kv_heads}, seq_len, {self.head_dim}]"
                )
        data = [(k.to(self.device, self.dtype)[None], v.to(self.device, self.dtype)[None]) for k, v in kv]
        return DynamicCache(data, config=self.model.config)

    @staticmethod
    def read_cache(cache: DynamicCache) -> list[LayerKV]:
        """Per-layer ``(k, v)``, each ``[num_kv_heads, seq_len, head_dim]`` contiguous (views of the cache)."""
        return [(layer.keys[0].contiguous(), layer.values[0].contiguous()) for layer in cache.layers]
