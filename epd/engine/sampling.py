"""Per-request token sampling: greedy, temperature, top-k, top-p, seed, stop conditions.

Follows the usual order of HF ``LogitsProcessor``s / vLLM's sampler: temperature scaling,
then top-k, then top-p (nucleus) filtering, then a multinomial draw from a per-request
``torch.Generator`` (same seed → same tokens). ``temperature == 0`` is greedy (argmax).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Mirror of ``epd.v1.SamplingParams``.

    Attributes:
        max_tokens: generated tokens at most (including the first, produced by prefill).
        temperature: 0 = greedy.
        top_p: keep the smallest set of tokens with cumulative probability ≥ top_p (1 = off).
        top_k: keep the k most likely tokens (0 = off).
        seed: seeds the request's generator; ``None`` draws from torch's global RNG state.
        stop_token_ids: extra ids that end generation (besides the model's EOS).
        ignore_eos: keep generating past EOS until ``max_tokens``.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    @classmethod
    def from_proto(cls, p) -> SamplingParams:  # p: epd.v1.SamplingParams
        return cls(
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p if 0 < p.top_p < 1 else 1.0,
            top_k=p.top_k,
            seed=p.seed if p.has_seed else None,
            stop_token_ids=list(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
        )


class Sampler:
    """Samples one request's tokens; holds its generator so draws continue across steps."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0 and params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    def sample(self, logits: torch.Tensor) -> int:
        """Pick the next token id from ``logits`` ``[vocab]`` (any float dtype)."""
        p = self.params
        if p.temperature <= 0:
            return int(torch.argmax(logits).item())
        scores = logits.float() / p.temperature
        if p.top_k > 0 and p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
            drop = cum - torch.softmax(sorted_scores, dim=-1) >= p.top_p  # keep the token crossing top_p
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


def finish_reason(
    token_id: int, num_generated: int, params: SamplingParams, eos_token_ids: set[int]
) -> str | None:
    """``"stop"`` / ``"length"`` when ``token_id`` (the ``num_generated``-th token) ends the request."""
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None
