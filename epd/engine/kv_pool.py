"""KV block pool: the one place the KV cache memory layout is defined (DESIGN.md §7).

Layout of a pool tensor (contiguous, ``dtype``)::

    [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]

A request owns a *block table*: the ids of the blocks holding its tokens in order; token
``t`` lives in block ``table[t // block_size]`` at slot ``t % block_size``. Putting the
layer axis outermost makes one layer's K (or V) for a run of consecutive blocks one
contiguous byte range, so a group of layers can be shipped as soon as it is computed
(EPD-Serve §3.3) with one transfer per (layer, K/V, block run).

The block allocator (:mod:`epd.engine.blocks`, torch-free so the planner's simulator runs the
same accounting) is re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epd import device
from epd.device import torch_dtype as to_torch_dtype
from epd.engine.blocks import BlockAllocator, OutOfBlocks  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class KvLayout:
    """Shape of a KV block pool (mirrors ``epd.v1.KvLayout``)."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return to_torch_dtype(self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one (layer, K or V, block) slab."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.num_layers * 2 * self.num_blocks * self.block_bytes

    def offset(self, layer: int, kv: int, block: int) -> int:
        """Byte offset of (layer, kv, block) from the start of the pool."""
        return ((layer * 2 + kv) * self.num_blocks + block) * self.block_bytes

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def with_blocks(self, num_blocks: int) -> KvLayout:
        return KvLayout(
            self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim, self.dtype
        )

    @staticmethod
    def blocks_in(memory_bytes: int, per_block_all_layers: int) -> int:
        return max(1, memory_bytes // per_block_all_layers)


def runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """Split a block table into runs of consecutive ids.

    Returns:
        ``(index in table, first block id, run length)`` per run,
        e.g. ``[4, 5, 6, 9]`` → ``[(0, 4, 3), (3, 9, 1)]``.
    """
    out: list[tuple[int, int, int]] = []
    for i, b in enumerate(block_ids):
        if out and out[-1][1] + out[-1][2] == b:
            idx, first, n = out[-1]
            out[-1] = (idx, first, n + 1)
        else:
            out.append((i, b, 1))
    return out


def transfer_plan(
    src: KvLayout, dst: KvLayout, dst_blocks: list[int], layers: range
) -> tuple[list[int], list[int], list[int]]:
    """Byte segments that copy a request's KV from a staging pool into a peer's pool.

    The staging pool ``src`` holds exactly the request's blocks ``0..len(dst_blocks)-1``
    in order; the destination holds them at ``dst_blocks``. One segment per
    (layer, K/V, run of consecutive destination blocks).

    Returns:
        ``(src_offsets, dst_offsets, lengths)`` in bytes.
    """
    assert src.block_bytes == dst.block_bytes, "staging and destination block geometry differ"
    bb = src.block_bytes
    src_off, dst_off, lengths = [], [], []
    for layer in layers:
        for kv in (0, 1):
            for idx, first, n in runs(dst_blocks):
                src_off.append(src.offset(layer, kv, idx))
                dst_off.append(dst.offset(layer, kv, first))
                lengths.append(n * bb)
    return src_off, dst_off, lengths


class KvPool:
    """A KV pool tensor over a (registered) byte region plus its allocator.

    The pool is used in place wherever ``storage`` lives: a transfer region allocated on the
    process device (``EPD_DEVICE``) makes the KV device memory that peers write into directly,
    with no host copy in between.

    Args:
        layout: pool geometry.
        storage: uint8 tensor of at least ``layout.nbytes`` bytes (e.g. ``Region.tensor`` of a
            transfer-registered region, on the device the model runs on); ``None`` allocates on
            the process device.

    Raises:
        ValueError: ``storage`` is too small.
    """

    def __init__(self, layout: KvLayout, storage: torch.Tensor | None = None) -> None:
        self.layout = layout
        if storage is None:
            storage = device.empty((layout.nbytes,), torch.uint8)
        if storage.numel() < layout.nbytes:
            raise ValueError(f"KV storage of {storage.numel()} bytes < {layout.nbytes} needed")
        self.kv = storage[: layout.nbytes].view(layout.torch_dtype).view(layout.shape)
        self.allocator = BlockAllocator(layout.num_blocks)

    def scatter(self, kv_per_layer: list[tuple[torch.Tensor, torch.Tensor]], block_ids: list[int]) -> None:
        """Store a request's KV. Each tensor is ``[num_kv_heads, num_tokens, head_dim]``."""
        bs = self.layout.block_size
        n = kv_per_layer[0][0].shape[1]
        nb = len(block_ids)
        assert nb * bs >= n, f"{nb} blocks cannot hold {n} tokens"
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.kv.device)
        for layer, (k, v) in enumerate(kv_per_layer):
            for kv_i, t in ((0, k), (1, v)):
                padded = t.new_zeros((nb * bs, t.shape[0], t.shape[2]))
                padded[:n] = t.transpose(0, 1)
                self.kv[layer, kv_i, ids] = padded.view(nb, bs, t.shape[0], t.shape[2]).to(self.kv.dtype)

    def write_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer of a request that owns blocks ``0..`` of this pool (a staging pool).

        ``k, v`` are ``[num_tokens, num_kv_heads, head_dim]``.
        """
        n = k.shape[0]
        nb = self.layout.blocks_for(n)
        flat = (nb * self.layout.block_size, self.layout.num_kv_heads, self.layout.head_dim)
        self.kv[layer, 0, :nb].view(flat)[:n] = k
        self.kv[layer, 1, :nb].view(flat)[:n] = v

    def gather(self, block_ids: list[int], num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A request's KV per layer: ``(k, v)`` each ``[num_kv_heads, num_tokens, head_dim]`` (copies)."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.kv.device)
        out = []
        for layer in range(self.layout.num_layers):
            pair = []
            for kv_i in (0, 1):
                t = self.kv[layer, kv_i, ids].reshape(-1, self.layout.num_kv_heads, self.layout.head_dim)
                pair.append(t[:num_tokens].transpose(0, 1).contiguous())
            out.append((pair[0], pair[1]))
        return out
