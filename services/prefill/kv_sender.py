"""Layer-grouped KV hand-off from prefill to decode by one-sided WRITE (EPD-Serve §3.3): the
:class:`~services.prefill.kv_connector.KvConnector` of a deployment.

While the packed prefill forward runs, each layer's K/V of every request in the batch is
copied into that request's staging area (a registered region laid out in decode's block
geometry); as soon as a group of ``G`` consecutive layers is staged, one asynchronous
one-sided WRITE per (layer, K/V, run of consecutive decode blocks) — merged where adjacent —
ships them into the decode instance's blocks, while later layers are still computing.
``G = 0`` is the baseline: everything is written after the last layer.

The *exposed* transfer time is what remains once the forward is done: the wait in
:meth:`KvSender.wait_for_save`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from epd.engine.kv_pool import KvLayout, KvPool, transfer_plan
from epd.engine.region_alloc import RangeAllocator
from epd.transfer import Region, TransferBackend, TransferError, TransferFuture, merge_segments
from services.prefill.kv_connector import KvConnector, KvSlot, SaveResult

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    request_id: str
    session: str
    dst: KvLayout
    block_ids: list[int]
    start: int  # first token of the request in the packed batch
    length: int
    staging_offset: int
    staging: KvPool
    futures: list[TransferFuture] = field(default_factory=list)
    error: str = ""


class KvSender(KvConnector):
    """Stages and ships prefill batches' KV, one batch at a time.

    Args:
        transfer: the instance's transfer backend.
        region: its registered region (staging areas are carved from it).
        staging: the region's range allocator (shared with the feature reads).
        num_layers: model layers.
        group: layers per transfer group ``G`` (0 = after the whole forward).

    Raises:
        epd.engine.region_alloc.RegionFull: from :meth:`start_batch` when staging space runs out.
    """

    def __init__(self, transfer: TransferBackend, region: Region, staging: RangeAllocator, num_layers: int,
                 group: int) -> None:
        self.transfer, self.region, self.staging = transfer, region, staging
        self.num_layers, self.group = num_layers, group
        self.entries: list[_Entry] = []
        self._next_layer = 0  # first layer not yet submitted
        self.t_forward_done = 0.0

    def start_batch(self, slots: list[KvSlot]) -> None:
        self.abort_batch()
        self.entries, self._next_layer = [], 0
        try:
            for slot in slots:
                self._add(slot)
        except Exception:
            self.abort_batch()
            raise

    def _add(self, slot: KvSlot) -> None:
        dst = slot.target.layout
        blocks = list(slot.target.block_ids[: dst.blocks_for(slot.length)])
        src = dst.with_blocks(len(blocks))
        off = self.staging.allocate(src.nbytes)
        staging = KvPool(src, self.region.tensor[off : off + src.nbytes])
        self.entries.append(_Entry(slot.request_id, slot.target.session, dst, blocks, slot.start, slot.length, off,
                                   staging))

    def save_kv_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stage layer ``layer`` (``k, v [T, kv_heads, head_dim]``); ship a group when complete."""
        for e in self.entries:
            e.staging.write_prefix(layer, k[e.start : e.start + e.length], v[e.start : e.start + e.length])
        last = layer == self.num_layers - 1
        if self.group > 0 and ((layer + 1 - self._next_layer) >= self.group or last):
            self._submit(range(self._next_layer, layer + 1))

    def _submit(self, layers: range) -> None:
        self._next_layer = layers.stop
        for e in self.entries:
            if e.error:
                continue
            local, remote, lengths = transfer_plan(e.staging.layout, e.dst, e.block_ids, layers)
            local, remote, lengths = merge_segments([o + e.staging_offset for o in local], remote, lengths)
            try:
                e.futures.append(self.transfer.write_async(self.region, e.session, local, remote, lengths))
            except TransferError as exc:
                e.error = str(exc)

    def wait_for_save(self) -> SaveResult:
        """Ship what is left, wait for every write, free the staging areas."""
        self.t_forward_done = time.perf_counter()
        if self.entries and self._next_layer < self.num_layers:
            self._submit(range(self._next_layer, self.num_layers))
        nbytes = 0
        for e in self.entries:
            for fut in e.futures:
                try:
                    fut.wait()
                    nbytes += fut.nbytes
                except TransferError as exc:
                    e.error = e.error or str(exc)
        exposed = time.perf_counter() - self.t_forward_done
        failed = {e.request_id: e.error for e in self.entries if e.error}
        self.abort_batch()
        self.entries = []
        return SaveResult(nbytes, exposed, failed)

    def abort_batch(self) -> None:
        """Free staging (idempotent); waits for writes still in flight first."""
        for e in self.entries:
            for fut in e.futures:
                if not fut.done():
                    try:
                        fut.wait()
                    except TransferError:
                        pass
            if e.staging_offset >= 0:
                self.staging.free(e.staging_offset)
                e.staging_offset = -1
