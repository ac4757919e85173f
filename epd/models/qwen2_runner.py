"""Packed prefill and paged, batched decode for the Qwen2-VL language model.

The serving engine's forward passes, written over the weights of a loaded HF
``Qwen2VLForConditionalGeneration`` (its ``Qwen2VLTextModel`` layers, norms, rotary embedding
and ``lm_head``), following ``Qwen2VLDecoderLayer.forward`` / ``Qwen2VLAttention.forward``:
pre-norm attention with GQA and biased q/k/v projections, M-RoPE (3-D positions,
recomposed by ``Qwen2VLRotaryEmbedding``), SiLU-gated MLP.

- :meth:`Qwen2VLRunner.prefill` packs several prompts into one token batch (no per-prompt
  padding: the GEMMs see all tokens at once, attention runs causally per prompt; bf16 on a CPU
  rounds the batch up to a row bucket, :mod:`epd.models.buckets`) and calls
  ``on_layer(layer, k, v)`` as soon as a layer's K/V exist, so the caller can ship KV layer
  group by layer group while later layers still compute (EPD-Serve §3.3).
- :meth:`Qwen2VLRunner.decode` runs one token for every request of a batch against the KV
  block pool (``epd.engine.kv_pool`` layout), writing the new token's K/V into its slot
  first. A step touches only the blocks of the requests in it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from epd.models.buckets import padded_rows
from epd.models.qwen2_vl import Qwen2VLAdapter

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF's ``apply_rotary_pos_emb``: ``x [T, heads, D]``, ``cos/sin [T, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Qwen2VLRunner:
    """Engine forward passes over an adapter's LM weights (shared, not copied).

    Args:
        adapter: a loaded :class:`Qwen2VLAdapter`.
    """

    def __init__(self, adapter: Qwen2VLAdapter) -> None:
        lm = adapter.model.model.language_model
        self.adapter = adapter
        self.embed_tokens = lm.embed_tokens
        self.layers = list(lm.layers)
        self.norm = lm.norm
        self.rotary = lm.rotary_emb
        self.lm_head = adapter.model.lm_head
        text = adapter.model.config.text_config
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = adapter.num_kv_heads
        self.head_dim = adapter.head_dim
        self.scaling = self.head_dim**-0.5
        self.device = adapter.device
        self.dtype = adapter.dtype

    # ------------------------------------------------------------------------------ shared
    def _qkv(self, layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # Separate q/k/v GEMMs: concatenating the weights (vLLM's QKVParallelLinear) measured
        # slower here with CPU BLAS at batch 8-32.
        attn = layer.self_attn
        t = h.shape[0]
        q = _rope(attn.q_proj(h).view(t, self.num_heads, self.head_dim), cos, sin)
        k = _rope(attn.k_proj(h).view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = attn.v_proj(h).view(t, self.num_kv_heads, self.head_dim)
        return q, k, v

    def _finish_layer(self, layer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        x = x + layer.self_attn.o_proj(attn_out.reshape(x.shape[0], -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _attend_each(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """Decode attention of a bf16/fp16 batch, one request at a time over exactly its context.

        ``q [B, heads, D]``, ``keys/values [B, L, kv_heads, D]`` (padded to the batch's widest
        block table), ``lens`` each request's context length → ``[B, heads, D]`` in ``q``'s dtype.
        Each request sees only its own ``lens[b]`` positions, so its result does not depend on
        the batch's padding (a masked batched kernel reduces over a padded width and rounds
        differently: measured 1 bf16 ulp). Computed in float32 (upcast q/K/V, 4-D SDPA with GQA):
        torch 2.13's CPU SDPA kernel for bf16 with one query is 6-8x slower than its float32
        kernel here (``benchmarks/bf16_agreement.py``, README "Dtype").
        """
        return torch.cat([
            F.scaled_dot_product_attention(
                q[b:b + 1, :, None, :].float(), keys[b:b + 1, :n].transpose(1, 2).float(),
                values[b:b + 1, :n].transpose(1, 2).float(), scale=self.scaling, enable_gqa=True,
            )[:, :, 0].to(q.dtype)
            for b, n in enumerate(lens)
        ])

    def _cos_sin(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(x[None], positions[:, None, :])  # [1, T, D]
        return cos[0], sin[0]

    # ------------------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(
        self, embeds: torch.Tensor, positions: torch.Tensor, seq_lens: list[int], on_layer: LayerCallback | None = None
    ) -> torch.Tensor:
        """One forward over several packed prompts.

        Args:
            embeds: ``[T, hidden]`` input embeddings of all prompts, concatenated
                (``T = sum(seq_lens)``), images already scattered in (:meth:`Qwen2VLAdapter.prompt_inputs`).
            positions: ``[3, T]`` int64 M-RoPE positions, each prompt's own.
            seq_lens: tokens per prompt, in order.
            on_layer: called after each layer's K/V are computed as ``on_layer(layer_index, k, v)``,
                ``k, v`` ``[T, num_kv_heads, head_dim]`` (K after RoPE, as cached).

        Returns:
            ``[len(seq_lens), vocab]`` next-token logits at each prompt's last position.

        In bfloat16/float16 on a CPU the GEMMs run on ``T`` rounded up to a row bucket
        (:func:`epd.models.buckets.padded_rows`: zero rows, attended by nothing, dropped), so that
        oneDNN generates kernels for a few dozen shapes instead of one per packed length.
        """
        bounds = [0, *torch.tensor(seq_lens).cumsum(0).tolist()]
        real = embeds.shape[0]
        if (pad := padded_rows(real, self.dtype, self.device) - real) > 0:  # bf16 on CPU: bucketed GEMM rows
            embeds = torch.cat([embeds, embeds.new_zeros(pad, embeds.shape[1])])
            positions = torch.cat([positions, positions.new_zeros(positions.shape[0], pad)], dim=1)
        cos, sin = self._cos_sin(embeds, positions)
        x = embeds
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(x), cos, sin)
            if on_layer is not None:
                on_layer(i, k[:real], v[:real])
            # causal attention within each prompt: Σ n_i² work, not (Σ n_i)² with a block mask
            # (4-D inputs: with 3-D ones torch 2.13 takes its slow math path for GQA on CPU)
            out = torch.cat([
                F.scaled_dot_product_attention(
                    q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                    is_causal=True, scale=self.scaling, enable_gqa=True,
                )[0].transpose(0, 1)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ] + ([q.new_zeros(pad, *q.shape[1:])] if pad > 0 else []))  # [T (+ pad), heads, D]
            x = self._finish_layer(layer, x, out)
        last = torch.tensor(bounds[1:], device=self.device) - 1
        return self.lm_head(self.norm(x[last]))

    # ------------------------------------------------------------------------------ decode
    @torch.inference_mode()
    def decode(
        self,
        token_ids: torch.Tensor,
        rope_positions: torch.Tensor,
        kv: torch.Tensor,
        block_tables: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step for a batch of requests against the paged KV pool.

        Args:
            token_ids: ``[B]`` int64, each request's last sampled token.
            rope_positions: ``[B]`` int64, ``past_len + rope_delta`` (all three M-RoPE axes
                are equal for generated tokens).
            kv: the pool, ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]``.
            block_tables: ``[B, max_blocks]`` int64 block ids (rows padded with any valid id).
            slots: ``[B]`` int64 cache index of the new token (= past_len); the request's
                context is slots ``0..slot`` inclusive.

        Returns:
            ``[B, vocab]`` logits.
        """
        if token_ids.shape[0] == 1 and self.dtype != torch.float32:
            # A one-row bf16/fp16 GEMM takes oneDNN's GEMV path, which rounds differently from the
            # GEMM path every batch of ≥ 2 rows takes (measured: ≥ 2 rows are row-for-row equal).
            # Running a lone request as two identical rows keeps its tokens independent of whether
            # it had company. Both rows write the same K/V into the same slot.
            two = self.decode(*(t.expand(2, *t.shape[1:]) for t in (token_ids, rope_positions)), kv,
                              block_tables.expand(2, -1), slots.expand(2))
            return two[:1]
        bsz = token_ids.shape[0]
        block_size = kv.shape[3]
        max_len = block_tables.shape[1] * block_size
        x = self.embed_tokens(token_ids)  # [B, hidden]
        cos, sin = self._cos_sin(x, rope_positions.view(1, -1).expand(3, -1))
        rows = torch.arange(bsz, device=self.device)
        slot_blocks = block_tables[rows, slots // block_size]
        slot_offsets = slots % block_size
        exact = self.dtype != torch.float32
        lens = (slots + 1).tolist() if exact else []
        padding = (torch.arange(max_len, device=self.device)[None, :] > slots[:, None])[:, None, :]  # [B, 1, L]
        group = self.num_heads // self.num_kv_heads
        shape = (bsz, max_len, self.num_kv_heads, self.head_dim)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(x), cos, sin)
            kv[i, 0, slot_blocks, slot_offsets] = k
            kv[i, 1, slot_blocks, slot_offsets] = v
            keys = kv[i, 0][block_tables].view(shape)  # [B, L, kv_heads, D], gathered from the blocks
            values = kv[i, 1][block_tables].view(shape)
            if exact:
                out = self._attend_each(q, keys, values, lens)
            else:
                q_groups = q.view(bsz, self.num_kv_heads, group, self.head_dim)
                # One query per request: per KV head, [B, group, D] x [B, D, L] batched GEMMs on strided
                # views of the gathered blocks (no K/V repeat, no transpose copies).
                heads = []
                for h in range(self.num_kv_heads):
                    scores = torch.bmm(q_groups[:, h], keys[:, :, h].transpose(1, 2)) * self.scaling
                    probs = torch.softmax(scores.masked_fill(padding, float("-inf")), dim=-1)
                    heads.append(torch.bmm(probs, values[:, :, h]))  # [B, group, D]
                out = torch.stack(heads, 1).reshape(bsz, self.num_heads, self.head_dim)
            x = self._finish_layer(layer, x, out)
        return self.lm_head(self.norm(x))
