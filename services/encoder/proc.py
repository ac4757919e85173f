"""Encoder process: EncodeRequest in, features into the pool, FeaturesReady out.

Loop steps: receive requests (decode images, answer cache hits at once) ▸ encode one batch
of queued images ▸ store + publish + notify prefill.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from PIL import Image

from epd.config import EncoderConfig
from epd.device import torch_dtype
from epd.engine.region_alloc import RegionFull
from epd.models.qwen2_vl import Qwen2VLAdapter, role_parts
from epd.registry.registry import FeatureEntry, RegistryError
from epd.service import ServiceProc
from epd.wire.gen import epd_pb2 as pb
from services.encoder.core import FeaturePool, ImageDecodeError, PoolEntry, decode_image

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 40_000_000


@dataclass
class _Job:
    request: pb.EncodeRequest
    item: pb.ImageItem
    image: Image.Image
    deadline: float


class EncoderProc(ServiceProc):
    def __init__(self, config: EncoderConfig, adapter: Qwen2VLAdapter | None = None) -> None:
        super().__init__(config, "encoder", config.feature_pool_mb << 20)
        self.cfg = config
        self.adapter = adapter or Qwen2VLAdapter.load(
            config.model, dtype=torch_dtype(config.dtype), parts=role_parts("encoder")
        )
        self.pool = FeaturePool(self.region.tensor, on_evict=self._on_evict)
        self.queue: deque[_Job] = deque()
        self.failed: set[str] = set()
        self._batch: list[_Job] = []  # the batch a step is encoding (failed if the step raises)
        # Requests this encoder still answers for: queued, or FeaturesReady sent and not yet
        # certain to be delivered (request id -> (request, monotonic expiry)).
        self.active: dict[str, tuple[pb.EncodeRequest, float]] = {}

    def handlers(self):
        return {"encode_request": self.on_encode_request, "abort_request": self.on_abort}

    def capacity(self):
        return {"feature_pool_bytes": self.region.nbytes}

    def load(self):
        jobs = list(self.queue)
        return {
            "queued_images": len(jobs),
            "queued_patches": sum(j.item.grid_thw[1] * j.item.grid_thw[2] for j in jobs if j.item.grid_thw),
            "pool_entries": len(self.pool),
            "pool_used_bytes": self.pool.used_bytes,
        }

    # -- handlers ----------------------------------------------------------------------
    def on_encode_request(self, env, req: pb.EncodeRequest, blobs: list[bytes]) -> None:
        deadline = time.time() + self.cfg.request_timeout_s
        self.active[req.request_id] = (req, time.monotonic() + self.cfg.request_timeout_s)
        self.track(req.request_id, ids=(env.sender, req.prefill_instance))
        jobs = []
        for item in req.images:
            hit = self.pool.lookup(item.mm_hash, deadline)
            if hit is not None:  # leased until the deadline: not evictable while prefill reads it
                logger.info("request %s: image %d cache hit %s", req.request_id, item.index, item.mm_hash[:12])
                self._publish(hit)  # refresh (or restore) the Redis entry's TTL
                self._notify(req, item, hit)
                continue
            try:
                if item.blob_index >= len(blobs):
                    raise ImageDecodeError(f"image {item.index}: missing media frame")
                image = decode_image(blobs[item.blob_index], MAX_IMAGE_PIXELS)
            except ImageDecodeError as exc:
                self._fail_request(req, pb.INVALID_REQUEST, f"image {item.index}: {exc}")
                return
            jobs.append(_Job(req, item, image, deadline))
        if jobs:
            self.queue.extend(jobs)
            self.active[req.request_id] = (req, time.monotonic() + self.cfg.request_timeout_s)

    def on_abort(self, env, msg: pb.AbortRequest, blobs) -> None:
        self.queue = deque(j for j in self.queue if j.request.request_id != msg.request_id)
        self.active.pop(msg.request_id, None)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.active

    def drop_request(self, request_id: str, code: int, reason: str, peer: str = "") -> None:
        req, _ = self.active.get(request_id, (None, 0.0))
        if req is not None:
            self._fail_request(req, code, reason, peer=peer)

    def on_step_error(self, exc: Exception) -> None:
        batch, self._batch = self._batch, []
        for job in batch:
            self._fail_request(job.request, pb.INTERNAL, f"encoder: step failed: {type(exc).__name__}: {exc}")

    # -- step --------------------------------------------------------------------------
    def step(self) -> bool:
        mono = time.monotonic()
        for rid in [r for r, (_, until) in self.active.items() if until < mono]:
            del self.active[rid]
        if not self.queue:
            return False
        batch = self._batch = self._take_batch()
        now = time.time()
        live = []
        for job in batch:
            if job.deadline < now:
                self._fail_request(job.request, pb.TIMEOUT, "encode queue timeout")
            elif job.request.request_id not in self.failed:
                live.append(job)
        if not live:
            return bool(self.queue)
        t0 = time.perf_counter()
        try:
            outputs = self.adapter.encode([j.image for j in live])
        except Exception as exc:
            logger.exception("encode batch failed")
            for job in live:
                self._fail_request(job.request, pb.INTERNAL, f"encoder error: {exc}")
            return bool(self.queue)
        logger.info("encoded %d image(s) in %.1f ms", len(live), (time.perf_counter() - t0) * 1e3)
        for job, (features, grid) in zip(live, outputs, strict=True):
            try:
                entry = self.pool.put(job.item.mm_hash, features, list(grid), job.deadline)
            except RegionFull as exc:
                self._fail_request(job.request, pb.OUT_OF_CAPACITY, f"feature pool full: {exc}")
                continue
            self._publish(entry)
            self._notify(job.request, job.item, entry)
        self._batch = []
        return bool(self.queue)

    def _take_batch(self) -> list[_Job]:
        """Oldest queued images within the image and patch budgets (at least one)."""
        batch: list[_Job] = []
        patches = 0
        while self.queue and len(batch) < self.cfg.encoder_max_images:
            grid = self.queue[0].item.grid_thw
            cost = grid[0] * grid[1] * grid[2] if len(grid) == 3 else 0
            if batch and patches + cost > self.cfg.encoder_max_patches:
                break
            batch.append(self.queue.popleft())
            patches += cost
        return batch

    # -- helpers -----------------------------------------------------------------------
    def _publish(self, entry: PoolEntry) -> None:
        meta = FeatureEntry(
            holder=self.instance_id, handle=self.region.handle, offset=entry.offset, nbytes=entry.nbytes,
            dtype=entry.dtype, shape=entry.shape, grid_thw=entry.grid_thw,
        )
        try:
            self.registry.put_feature(entry.mm_hash, meta, self.cfg.feature_ttl_s)
        except RegistryError as exc:  # the cache is an optimisation; the request goes on
            logger.warning("feature %s not published: %s", entry.mm_hash[:12], exc)

    def _on_evict(self, mm_hash: str) -> None:
        try:
            self.registry.delete_feature(mm_hash, holder=self.instance_id)
        except RegistryError as exc:
            logger.warning("feature %s not unpublished: %s", mm_hash[:12], exc)

    def _notify(self, req: pb.EncodeRequest, item: pb.ImageItem, entry: PoolEntry) -> None:
        ref = pb.TensorRef(
            session=self.region.handle, offset=entry.offset, nbytes=entry.nbytes,
            dtype=entry.dtype, shape=entry.shape,
        )
        msg = pb.FeaturesReady(
            request_id=req.request_id, mm_hash=item.mm_hash, index=item.index, features=ref,
            grid_thw=entry.grid_thw, encoder_instance=self.instance_id,
        )
        self.send(req.prefill_inbox, msg)
        if not any(j.request.request_id == req.request_id for j in self.queue):
            # Every image answered: keep answering for it only until delivery is certain.
            self.active[req.request_id] = (req, time.monotonic() + self.cfg.send_timeout_s + 1)

    def _fail_request(self, req: pb.EncodeRequest, code: int, message: str, peer: str = "") -> None:
        self.active.pop(req.request_id, None)
        if req.request_id in self.failed:
            return
        self.failed.add(req.request_id)
        if len(self.failed) > 10_000:
            self.failed.clear()
        self.queue = deque(j for j in self.queue if j.request.request_id != req.request_id)
        self.fail(req.reply_to, req.request_id, code, message, peer=peer)
        if peer not in (req.prefill_instance, req.prefill_inbox):
            self.send(req.prefill_inbox, pb.AbortRequest(request_id=req.request_id, reason=message))

    def fail_all(self, reason: str) -> None:
        for job in list(self.queue):
            self._fail_request(job.request, pb.UNAVAILABLE, reason)
        for mm_hash in self.pool.clear():
            self._on_evict(mm_hash)
