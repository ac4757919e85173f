"""The prefill engine's only view of where KV goes: :class:`KvConnector` (vLLM v1's KV connector
shape, worker side: ``save_kv_layer`` per layer during the forward, ``wait_for_save`` after it).

Lifecycle of one batch through a connector::

    start_batch(slots)          staging reserved per request (may raise RegionFull)
      ▸ save_kv_layer(l, k, v)  once per layer, in order, while later layers compute; the
                                connector ships a group of layers as soon as it is complete
      ▸ wait_for_save()         the rest is shipped and waited for; staging freed
      (abort_batch() instead, after an error: waits for writes in flight, frees staging)

Implementations: :class:`services.prefill.kv_sender.KvSender` (one-sided WRITE into a decode
instance's registered blocks) and :class:`PoolKvConnector` (decode's pool in this process:
``epd.engine.local`` and tests).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from epd.engine.kv_pool import KvPool
from services.prefill.records import KvTarget


@dataclass(frozen=True)
class KvSlot:
    """One request of a packed batch: tokens ``[start, start + length)`` of the batch go to ``target``."""

    request_id: str
    target: KvTarget
    start: int
    length: int


@dataclass
class SaveResult:
    """Outcome of one batch's KV hand-off.

    Attributes:
        nbytes: bytes written.
        exposed_s: seconds between the end of the forward and the last write completing.
        failed: request id → error message for requests whose KV did not arrive.
    """

    nbytes: int
    exposed_s: float
    failed: dict[str, str]


class KvConnector(abc.ABC):
    """Moves one packed prefill batch's KV into decode's blocks, layer by layer.

    One batch at a time: :meth:`start_batch` ▸ :meth:`save_kv_layer` for every layer ▸
    :meth:`wait_for_save` (or :meth:`abort_batch`).
    """

    @abc.abstractmethod
    def start_batch(self, slots: list[KvSlot]) -> None:
        """Prepare the batch's requests (packed in ``slots`` order).

        Raises:
            epd.engine.region_alloc.RegionFull: no staging space (nothing stays reserved).
        """

    @abc.abstractmethod
    def save_kv_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Layer ``layer``'s K/V of the whole batch, ``[T, num_kv_heads, head_dim]`` each (K after
        RoPE), ``T`` the packed token count. Called once per layer in increasing order."""

    @abc.abstractmethod
    def wait_for_save(self) -> SaveResult:
        """Ship what is left and wait for it; frees the batch's staging. Call once the forward
        is done: the time spent here is the exposed transfer time."""

    @abc.abstractmethod
    def abort_batch(self) -> None:
        """Give up on the batch (idempotent): wait for writes in flight, free staging."""


class PoolKvConnector(KvConnector):
    """Writes each layer straight into a decode pool of this process (no transfer).

    Args:
        pools: transfer session name → the :class:`KvPool` a :class:`KvTarget` names by it.
    """

    def __init__(self, pools: dict[str, KvPool]) -> None:
        self.pools = pools
        self.slots: list[KvSlot] = []
        self.nbytes = 0

    def start_batch(self, slots: list[KvSlot]) -> None:
        self.slots, self.nbytes = list(slots), 0

    def save_kv_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for slot in self.slots:
            pool = self.pools[slot.target.session]
            bs = pool.layout.block_size
            blocks = list(slot.target.block_ids[: pool.layout.blocks_for(slot.length)])
            ids = torch.tensor(blocks, dtype=torch.long, device=pool.kv.device)
            for kv_i, t in ((0, k), (1, v)):
                part = t[slot.start : slot.start + slot.length]
                padded = part.new_zeros((len(blocks) * bs, *part.shape[1:]))
                padded[: slot.length] = part
                pool.kv[layer, kv_i, ids] = padded.view(len(blocks), bs, *part.shape[1:]).to(pool.kv.dtype)
                self.nbytes += len(blocks) * pool.layout.block_bytes

    def wait_for_save(self) -> SaveResult:
        self.slots = []
        return SaveResult(self.nbytes, 0.0, {})

    def abort_batch(self) -> None:
        self.slots = []
