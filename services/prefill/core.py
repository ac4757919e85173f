"""Prefill request state and batch choice (pure: no sockets, transfers or protobuf).

Lifecycle of a request in prefill (SGLang-style)::

    Bootstrap (PrefillRequest accepted at once; KvAllocRequest sent to decode)
      ▸ Waiting: features prefetched (FeaturesReady → asynchronous READ from the encoder's
        pool while the request waits in the queue, EPD-Serve §3.2) and decode blocks
        reserved (KvAllocated)
      ▸ Ready: every image's features local and blocks reserved
      ▸ Run: packed with other ready requests under the token budget; one forward; first
        token → gateway; KV written to decode layer group by layer group while later layers
        compute
      ▸ Saving: the rest of the KV written and waited for ▸ KvReady to decode ▸ done

A request that ends with its first token (EOS, ``max_tokens == 1``) releases its decode
blocks with ``AbortRequest`` instead of ``KvReady``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from epd.engine.kv_pool import KvLayout
from services.prefill.feature_reader import FeatureRead
from services.prefill.records import KvTarget, PrefillRequest


@dataclass
class PrefillState:
    """One request inside prefill.

    Attributes:
        req: the request.
        features: image index → features ``[num_tokens, hidden]`` already local.
        grids: image index → ``(t, h, w)`` patch grid.
        reads: image index → feature read still in flight.
        kv_target: decode's block reservation, once it arrived.
        t_arrival: perf_counter() at acceptance.
    """

    req: PrefillRequest
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    grids: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    reads: dict[int, FeatureRead] = field(default_factory=dict)
    kv_target: KvTarget | None = None
    t_arrival: float = field(default_factory=time.perf_counter)

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def num_tokens(self) -> int:
        return self.req.num_tokens

    @property
    def deadline(self) -> float:
        return self.req.deadline

    def is_ready(self) -> bool:
        return self.kv_target is not None and len(self.features) == self.req.num_images

    def ordered_features(self) -> tuple[list[torch.Tensor], list[tuple[int, int, int]]]:
        """Features and grids in prompt order."""
        order = sorted(self.features)
        return [self.features[i] for i in order], [self.grids[i] for i in order]

    def features_pending(self) -> int:
        return self.req.num_images - len(self.features)


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


def check_kv_compatible(layout: KvLayout, num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> None:
    """Raise ``ValueError`` when decode's pool geometry does not match this model's KV."""
    got = (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype)
    want = (num_layers, num_kv_heads, head_dim, dtype)
    if got != want:
        raise ValueError(f"decode KV layout (layers, kv_heads, head_dim, dtype)={got}, model has {want}")
