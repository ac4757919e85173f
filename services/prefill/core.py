"""Prefill core: per-request state, feature prefetch bookkeeping, batch choice (no sockets).

Lifecycle of a request in prefill (SGLang-style)::

    Bootstrap (PrefillRequest accepted at once; KvAllocRequest sent to decode)
      ▸ Waiting: features prefetched (FeaturesReady → asynchronous one-sided READ from the
        encoder's pool while the request waits in the queue, EPD-Serve §3.2) and decode
        blocks reserved (KvAllocated)
      ▸ Ready: every image's features local and blocks reserved
      ▸ Run: packed with other ready requests under the token budget; one forward; first
        token → gateway; KV written to decode layer group by layer group while later layers
        compute ▸ KvReady to decode ▸ done

A request that ends with its first token (EOS, ``max_tokens == 1``) releases its decode
blocks with ``AbortRequest`` instead of ``KvReady``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from epd.engine.kv_pool import KvLayout
from epd.transfer import TransferFuture
from epd.wire.gen import epd_pb2 as pb


@dataclass
class Prefetch:
    """An in-flight READ of one image's features into the staging region."""

    index: int
    ref: pb.TensorRef
    grid_thw: tuple[int, int, int]
    staging_offset: int
    future: TransferFuture
    encoder_instance: str
    t_ready: float  # perf_counter() when FeaturesReady arrived


@dataclass
class PrefillState:
    """One request inside prefill.

    Attributes:
        req: the gateway's request.
        features: image index → features ``[num_tokens, hidden]`` already local.
        grids: image index → ``(t, h, w)`` patch grid.
        prefetches: reads still in flight.
        kv_alloc: decode's block reservation, once it arrived.
        deadline: unix seconds; past it the request fails with TIMEOUT.
        t_arrival: perf_counter() at acceptance; t_ready: when it became schedulable.
    """

    req: pb.PrefillRequest
    deadline: float
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    grids: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    prefetches: dict[int, Prefetch] = field(default_factory=dict)
    kv_alloc: pb.KvAllocated | None = None
    t_arrival: float = field(default_factory=time.perf_counter)

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.req.prompt_token_ids)

    def is_ready(self) -> bool:
        return self.kv_alloc is not None and len(self.features) == len(self.req.images)

    def ordered_features(self) -> tuple[list[torch.Tensor], list[tuple[int, int, int]]]:
        """Features and grids in prompt order."""
        order = sorted(self.features)
        return [self.features[i] for i in order], [self.grids[i] for i in order]

    def features_pending(self) -> int:
        return len(self.req.images) - len(self.features)


def pick_batch(ready: list[PrefillState], max_tokens: int) -> list[PrefillState]:
    """Oldest-first ready requests whose prompts fit ``max_tokens`` together (at least one)."""
    batch: list[PrefillState] = []
    total = 0
    for state in ready:
        if batch and total + state.num_tokens > max_tokens:
            break
        batch.append(state)
        total += state.num_tokens
    return batch


def layout_from_proto(p: pb.KvLayout) -> KvLayout:
    return KvLayout(p.num_layers, p.num_blocks, p.block_size, p.num_kv_heads, p.head_dim, p.dtype)


def check_kv_compatible(layout: KvLayout, num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> None:
    """Raise ``ValueError`` when decode's pool geometry does not match this model's KV."""
    got = (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype)
    want = (num_layers, num_kv_heads, head_dim, dtype)
    if got != want:
        raise ValueError(f"decode KV layout (layers, kv_heads, head_dim, dtype)={got}, model has {want}")
