"""The serving pipeline in one process, without sockets, Redis or processes.

:class:`LocalPipeline` drives the three engine cores a deployment runs —
:class:`services.encoder.engine.EncodeEngine` (vision forward into a feature pool) →
:class:`services.prefill.engine.PrefillEngine` (features read from that pool, packed prefill,
first token, KV handed to a connector layer by layer) → :class:`services.decode.core.DecodeEngine`
(continuous batching over the paged pool) — with the hand-offs done in place: features copied
out of the pool, KV written into decode's pool (or through any KV connector, e.g. a real
transfer backend). The same compute path as a deployment; used to measure numerics (bf16
agreement, batch invariance: ``benchmarks/bf16_agreement.py``), by tests and by benchmarks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from epd import device
from epd.engine.kv_pool import KvLayout, KvPool
from epd.engine.sampling import SamplingParams
from epd.models.qwen2_runner import Qwen2VLRunner
from epd.models.qwen2_vl import Qwen2VLAdapter

ENCODER_SESSION = "local-encoder"  # the in-process feature pool's session name
DECODE_SESSION = "local-decode"  # the in-process KV pool's session name (PoolKvConnector)


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


def feature_pool_bytes(adapter: Qwen2VLAdapter, prompts: list[list[int]], images: int) -> int:
    """An upper bound on the feature pool the prompts need (image tokens ≤ prompt tokens)."""
    hidden = adapter.model.config.text_config.hidden_size
    return sum(len(p) for p in prompts) * hidden * adapter.dtype.itemsize + 4096 * (images + 1)


def image_hash(image) -> str:
    """The feature-cache key of a PIL image: sha256 of its mode, size and pixels."""
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


class LocalPipeline:
    """Encode → prefill → decode engines in this process, driven one decode step at a time.

    Requests wait in decode's admission queue for blocks; the step that admits them encodes
    their images (one vision forward per request), prefills all of them in one packed forward
    (their KV written into their blocks while later layers compute) and starts them decoding.

    Args:
        adapter: a loaded adapter (vision + language; its dtype is the compute dtype).
        pool: decode's KV pool.
        max_batch: requests per decode step.
        kv: the prefill's KV connector (default: :class:`PoolKvConnector` into ``pool``).
        kv_session: the session name under which ``kv`` reaches ``pool``.
        features_bytes: feature pool size (bytes; entries stay leased, nothing is evicted).
        staging: the allocator of ``kv``'s staging buffer, reported in the prefill load.
        return_logits: keep each request's prefill logits (:attr:`prefill_logits`).

    Raises:
        RuntimeError: from :meth:`step` when an engine fails a request (a test or measurement bug).
    """

    def __init__(self, adapter: Qwen2VLAdapter, pool: KvPool, max_batch: int, kv=None,
                 kv_session: str = DECODE_SESSION, features_bytes: int = 64 << 20, staging=None,
                 return_logits: bool = False) -> None:
        from services.decode.core import DecodeEngine
        from services.encoder.engine import EncodeEngine
        from services.prefill.engine import PrefillEngine
        from services.prefill.feature_reader import LocalFeatureReader
        from services.prefill.kv_connector import PoolKvConnector

        self.adapter, self.pool, self.kv_session = adapter, pool, kv_session
        self.runner = Qwen2VLRunner(adapter)
        region = device.empty((features_bytes,), torch.uint8)
        self.encoder = EncodeEngine(adapter, region, max_images=1 << 30, max_patches=1 << 62)
        self.prefill = PrefillEngine(adapter, kv or PoolKvConnector({kv_session: pool}),
                                     LocalFeatureReader({ENCODER_SESSION: region}), max_tokens=1 << 62,
                                     staging=staging, runner=self.runner, return_logits=return_logits)
        self.decode = DecodeEngine(self.runner, pool, max_batch=max_batch, eos_token_ids=set(adapter.eos_token_ids))
        self.submitted: dict[str, tuple[list[int], list, SamplingParams]] = {}
        self.prefill_logits: dict[str, torch.Tensor] = {}

    @property
    def num_requests(self) -> int:
        """Requests waiting for blocks or decoding."""
        return self.decode.sched.num_requests

    def submit(self, request_id: str, prompt_ids: list[int], images: list, params: SamplingParams) -> None:
        """Queue a request for blocks (``ValueError`` if it can never fit the pool)."""
        self.submitted[request_id] = (list(prompt_ids), list(images), params)
        self.decode.request_blocks(request_id, len(prompt_ids), math.inf, "local")

    def step(self) -> list[tuple[str, int, str | None]]:
        """One decode step, then encode + prefill + start of what it admitted.

        Returns:
            ``(request id, token id, finish reason or None)`` of every token produced: the
            decode step's first, then the first tokens of the admitted requests.
        """
        out = self.decode.step()
        if out.failed:
            raise RuntimeError(f"decode failed: {[(r.request_id, c, m) for r, c, m in out.failed]}")
        tokens = [(req.request_id, token, reason) for req, token, reason in out.tokens]
        for req, _, reason in out.tokens:
            if reason is not None:
                self.submitted.pop(req.request_id, None)
        if out.admitted:
            tokens += self._prefill(out.admitted)
        return tokens

    def _prefill(self, admitted) -> list[tuple[str, int, str | None]]:
        from services.encoder.records import EncodeRequest, ImageInput
        from services.prefill.records import FeatureRef, KvTarget, PrefillRequest

        for dec in admitted:
            prompt, images, params = self.submitted[dec.request_id]
            self.prefill.add(PrefillRequest(dec.request_id, prompt, len(images), params, math.inf))
            self.prefill.set_kv_target(dec.request_id, KvTarget(self.kv_session, self.pool.layout,
                                                                tuple(dec.block_ids)))
            if not images:
                continue
            self.encoder.add(EncodeRequest(dec.request_id, [ImageInput(i, image_hash(im), image=im)
                                                            for i, im in enumerate(images)], math.inf))
            enc = self.encoder.step()
            if enc.failed or enc.busy:
                raise RuntimeError(f"encode failed: {[(f.code, f.message) for f in enc.failed]}")
            for ready in enc.ready:
                e = ready.entry
                self.prefill.add_features(dec.request_id, FeatureRef(
                    ready.index, ENCODER_SESSION, e.offset, e.nbytes, e.dtype, tuple(e.shape), tuple(e.grid_thw)))
        firsts, handed = [], 0
        while handed < len(admitted):
            out = self.prefill.step()
            if out.failed:
                raise RuntimeError(f"prefill failed: {[(f.code, f.message) for f in out.failed]}")
            for first in out.first_tokens:
                firsts.append((first.request.request_id, first.token_id, first.finish_reason))
                if first.logits is not None:
                    self.prefill_logits[first.request.request_id] = first.logits
            for handoff in out.handoffs:
                req = handoff.request
                self.decode.start(req.request_id, handoff.first_token_id, handoff.rope_delta, req.params, math.inf)
            for release in out.releases:  # ended with its first token
                self.decode.abort(release.request.request_id)
                self.submitted.pop(release.request.request_id, None)
            handed += len(out.handoffs) + len(out.releases)
        return firsts


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
        ValueError: duplicate request ids or ``max_batch < 1``.
        RuntimeError: an engine failed a request (e.g. image placeholders not matching the images).
    """
    if max_batch < 1 or len({r.request_id for r in requests}) != len(requests):
        raise ValueError("max_batch must be ≥ 1 and request ids unique")
    need = sum(-(-(len(r.prompt_ids) + r.max_tokens) // block_size) for r in requests)
    layout = KvLayout(adapter.num_layers, need + 1, block_size, adapter.num_kv_heads, adapter.head_dim,
                      str(adapter.dtype).removeprefix("torch."))
    pipe = LocalPipeline(adapter, KvPool(layout), max_batch, return_logits=True,
                         features_bytes=feature_pool_bytes(adapter, [r.prompt_ids for r in requests],
                                                           sum(len(r.images) for r in requests)))
    tokens: dict[str, list[int]] = {}
    pending = list(requests)
    while pending or pipe.num_requests:
        if pending and not pipe.num_requests:  # a new wave once the last one is done
            for r in pending[:max_batch]:
                pipe.submit(r.request_id, r.prompt_ids, r.images, SamplingParams(max_tokens=r.max_tokens))
            pending = pending[max_batch:]
        for request_id, token, _ in pipe.step():
            tokens.setdefault(request_id, []).append(token)
    return {r.request_id: LocalResult(tokens[r.request_id], pipe.prefill_logits[r.request_id]) for r in requests}


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
