"""Prefill core: per-request state and the KV hand-off plan (no sockets).

Lifecycle of a request in prefill (SGLang-style)::

    Bootstrap (PrefillRequest received; KvAllocRequest sent to decode)
      ▸ Waiting (features arriving via FeaturesReady + one-sided READ; KvAllocated arriving)
      ▸ Ready (every image's features local and decode blocks reserved)
      ▸ Run (LM forward over the prompt → first token → gateway)
      ▸ Transfer (KV written into decode's blocks) ▸ KvReady to decode ▸ done

A request that ends with its first token (EOS, ``max_tokens == 1``) skips the transfer and
releases its decode blocks with ``AbortRequest``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from epd.engine.kv_pool import KvLayout
from epd.wire.gen import epd_pb2 as pb


@dataclass
class PrefillState:
    """One request inside prefill.

    Attributes:
        req: the gateway's request.
        features: image index → features ``[num_tokens, hidden]`` already local.
        grids: image index → ``(t, h, w)`` patch grid.
        kv_alloc: decode's block reservation, once it arrived.
        deadline: unix seconds; past it the request fails with TIMEOUT.
    """

    req: pb.PrefillRequest
    deadline: float
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    grids: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    kv_alloc: pb.KvAllocated | None = None

    @property
    def request_id(self) -> str:
        return self.req.request_id

    def is_ready(self) -> bool:
        return self.kv_alloc is not None and len(self.features) == len(self.req.images)

    def ordered_features(self) -> tuple[list[torch.Tensor], list[tuple[int, int, int]]]:
        """Features and grids in prompt order."""
        order = sorted(self.features)
        return [self.features[i] for i in order], [self.grids[i] for i in order]

    def features_pending(self) -> int:
        return len(self.req.images) - len(self.features)


def layout_from_proto(p: pb.KvLayout) -> KvLayout:
    return KvLayout(p.num_layers, p.num_blocks, p.block_size, p.num_kv_heads, p.head_dim, p.dtype)


def check_kv_compatible(layout: KvLayout, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
    """Raise ``ValueError`` when decode's pool geometry does not match this model's KV."""
    got = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
    want = (num_layers, num_kv_heads, head_dim)
    if got != want:
        raise ValueError(f"decode KV layout (layers, kv_heads, head_dim)={got}, model has {want}")
