"""The serving pipeline in one process, without sockets, Redis or transfers.

Encoder forward → packed prefill (:meth:`Qwen2VLRunner.prefill`) → the prompt KV scattered
into a paged :class:`~epd.engine.kv_pool.KvPool` → continuous-batching decode
(:class:`services.decode.core.DecodeEngine`): the same compute path as a deployment, with the
KV copied in place instead of written one-sided (the bytes are identical). Used to measure
numerics (bf16 agreement, batch invariance: ``benchmarks/bf16_agreement.py``) and by tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from epd.engine.kv_pool import KvLayout, KvPool
from epd.engine.sampling import Sampler, SamplingParams, finish_reason
from epd.models.qwen2_runner import Qwen2VLRunner
from epd.models.qwen2_vl import Qwen2VLAdapter


@dataclass
class LocalRequest:
    """One prompt: token ids with each image's ``<|image_pad|>`` run expanded, its PIL images in
    prompt order, and the number of tokens to generate (greedy, EOS ends it early)."""

    request_id: str
    prompt_ids: list[int]
    images: list = field(default_factory=list)
    max_tokens: int = 32


@dataclass
class LocalResult:
    """Greedy tokens (``≤ max_tokens``) and the prefill's last-position logits ``[vocab]`` float32 CPU."""

    tokens: list[int]
    prefill_logits: torch.Tensor


def run_greedy(adapter: Qwen2VLAdapter, requests: list[LocalRequest], *, max_batch: int,
               block_size: int = 16) -> dict[str, LocalResult]:
    """Serve ``requests`` greedily, ``max_batch`` at a time in prefill and decode.

    With ``max_batch = len(requests)`` every prompt is packed into one prefill forward and decoded
    in one batch; with ``max_batch = 1`` each runs alone. Equal outputs between the two show the
    result does not depend on batch composition.

    Args:
        adapter: a loaded adapter (its dtype is the compute dtype; the pool uses it too).
        requests: prompts with unique ids.
        max_batch: requests per prefill forward and per decode step (≥ 1).
        block_size: KV block size (tokens).

    Returns:
        ``{request_id: LocalResult}``.

    Raises:
        ValueError: duplicate request ids or ``max_batch < 1``; as :meth:`Qwen2VLAdapter.prompt_inputs`.
    """
    from services.decode.core import DecodeEngine

    if max_batch < 1 or len({r.request_id for r in requests}) != len(requests):
        raise ValueError("max_batch must be ≥ 1 and request ids unique")
    runner = Qwen2VLRunner(adapter)
    need = sum(-(-(len(r.prompt_ids) + r.max_tokens) // block_size) for r in requests)
    layout = KvLayout(adapter.num_layers, need + 1, block_size, adapter.num_kv_heads, adapter.head_dim,
                      str(adapter.dtype).removeprefix("torch."))
    pool = KvPool(layout)
    eos = set(adapter.eos_token_ids)
    engine = DecodeEngine(runner, pool, max_batch=max_batch, eos_token_ids=eos)
    by_id = {r.request_id: r for r in requests}
    results: dict[str, LocalResult] = {}
    pending = list(requests)
    while pending or engine.sched.num_requests:
        if pending and not engine.sched.num_requests:  # a new wave once the last one is done
            for r in pending[:max_batch]:
                engine.request_blocks(r.request_id, len(r.prompt_ids), 1e18, "local")
            pending = pending[max_batch:]
        step = engine.step()
        if step.failed:
            raise RuntimeError(f"decode failed: {step.failed[0][1:]}")
        for req, token, _ in step.tokens:
            results[req.request_id].tokens.append(token)
        if step.admitted:
            _prefill(adapter, runner, pool, engine, [by_id[a.request_id] for a in step.admitted],
                     step.admitted, eos, results)
    return results


def _prefill(adapter, runner, pool, engine, reqs: list[LocalRequest], admitted, eos, results) -> None:
    inputs = []
    for r in reqs:
        encoded = adapter.encode(r.images) if r.images else []
        inputs.append(adapter.prompt_inputs(r.prompt_ids, [f for f, _ in encoded], [g for _, g in encoded]))
    per_layer: list[tuple[torch.Tensor, torch.Tensor]] = []
    logits = runner.prefill(torch.cat([e for e, _, _ in inputs]), torch.cat([p for _, p, _ in inputs], 1),
                            [e.shape[0] for e, _, _ in inputs], lambda _i, k, v: per_layer.append((k, v)))
    start = 0
    for row, (r, dec, (emb, _, delta)) in enumerate(zip(reqs, admitted, inputs, strict=True)):
        n = emb.shape[0]
        pool.scatter([(k[start:start + n].transpose(0, 1), v[start:start + n].transpose(0, 1))
                      for k, v in per_layer], dec.block_ids)
        start += n
        params = SamplingParams(max_tokens=r.max_tokens)
        token = Sampler(params, runner.device).sample(logits[row])
        results[r.request_id] = LocalResult([token], logits[row].float().cpu())
        if finish_reason(token, 1, params, eos):
            engine.abort(r.request_id)
        else:
            engine.start(r.request_id, token, delta, params, 1e18)


@torch.inference_mode()
def teacher_forced(adapter: Qwen2VLAdapter, request: LocalRequest, tokens: list[int],
                   logits: list[torch.Tensor]) -> tuple[float, float]:
    """Feed a reference's greedy tokens through our prefill + paged decode (batch 1) and compare
    each step's logits with the reference's.

    Teacher forcing keeps both sides on one token path, so a near-tie flipped early does not make
    every later step differ: it isolates the per-step numerics from the cascade.

    Args:
        adapter: the pipeline's model (its dtype is the compute dtype).
        request: the prompt (``max_tokens`` unused).
        tokens: the reference's generated tokens, ``len(logits)`` of them.
        logits: the reference's ``[vocab]`` logits before each of ``tokens`` (HF
            ``generate(output_logits=True)``), float32.

    Returns:
        ``(max over steps of max |Δlogit| ÷ std(reference logits), share of steps whose argmax
        is the reference's token)``.
    """
    runner = Qwen2VLRunner(adapter)
    encoded = adapter.encode(request.images) if request.images else []
    emb, pos, delta = adapter.prompt_inputs(request.prompt_ids, [f for f, _ in encoded], [g for _, g in encoded])
    n = emb.shape[0]
    layout = KvLayout(adapter.num_layers, -(-(n + len(tokens)) // 16), 16, adapter.num_kv_heads, adapter.head_dim,
                      str(adapter.dtype).removeprefix("torch."))
    pool = KvPool(layout)
    per_layer = []
    out = runner.prefill(emb, pos, [n], lambda _i, k, v: per_layer.append((k, v)))
    pool.scatter([(k.transpose(0, 1), v.transpose(0, 1)) for k, v in per_layer], list(range(layout.num_blocks)))
    table = torch.arange(layout.num_blocks)[None]
    diffs, hits = [], 0
    for i, want in enumerate(logits):
        got = out[0].float()
        diffs.append(float((got - want).abs().max() / want.std()))
        hits += int(got.argmax()) == tokens[i]
        if i + 1 < len(logits):
            slot = torch.tensor([n + i])
            out = runner.decode(torch.tensor([tokens[i]]), slot + delta, pool.kv, table, slot)
    return max(diffs), hits / len(logits)
