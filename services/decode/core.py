"""Decode core: block reservations and running sequences (no sockets).

Lifecycle of a request in decode (SGLang-style)::

    Prealloc (KvAllocRequest: blocks reserved, KvAllocated back to prefill)
      ▸ Transfer (prefill WRITEs the prompt KV into the blocks)
      ▸ Running (KvReady: joins the running set at the next step)
      ▸ Finished / aborted / failed / timed out: blocks freed

Admission reserves blocks for the prompt plus ``max_tokens``, so a running request never
runs out of room mid-generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from epd.engine.kv_pool import KvPool, OutOfBlocks
from epd.engine.sampling import Sampler, SamplingParams


@dataclass
class Reservation:
    """Blocks held for a request between KvAllocRequest and its end."""

    request_id: str
    block_ids: list[int]
    num_prompt_tokens: int
    deadline: float


@dataclass
class Sequence:
    """A running request.

    Attributes:
        tokens: generated token ids so far (the first came from prefill).
        past_len: tokens whose KV is in the cache (prompt + generated − 1).
        rope_delta: M-RoPE offset: position of the next token is ``past_len + rope_delta``.
        cache: the model adapter's per-request KV cache object.
    """

    reservation: Reservation
    params: SamplingParams
    sampler: Sampler
    reply_to: str
    rope_delta: int
    past_len: int
    cache: Any
    tokens: list[int] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.reservation.request_id


class BlockLedger:
    """Reservations over a :class:`KvPool`; every path that ends a request calls :meth:`release`."""

    def __init__(self, pool: KvPool) -> None:
        self.pool = pool
        self.reservations: dict[str, Reservation] = {}

    def reserve(self, request_id: str, num_prompt_tokens: int, max_new_tokens: int, deadline: float) -> Reservation:
        """Reserve blocks for prompt + ``max_new_tokens``.

        Raises:
            OutOfBlocks: not enough free blocks (nothing is taken).
            ValueError: the request already holds a reservation.
        """
        if request_id in self.reservations:
            raise ValueError(f"request {request_id} already holds KV blocks")
        n = self.pool.layout.blocks_for(num_prompt_tokens + max_new_tokens)
        if n > self.pool.layout.num_blocks:
            raise OutOfBlocks(
                f"request needs {n} KV blocks but the pool has {self.pool.layout.num_blocks} in total"
            )
        ids = self.pool.allocator.allocate(n)
        res = Reservation(request_id, ids, num_prompt_tokens, deadline)
        self.reservations[request_id] = res
        return res

    def release(self, request_id: str) -> bool:
        """Free the request's blocks; False when it held none."""
        res = self.reservations.pop(request_id, None)
        if res is None:
            return False
        self.pool.allocator.free(res.block_ids)
        return True

    def expired(self, now: float) -> list[str]:
        return [r.request_id for r in self.reservations.values() if r.deadline < now]
