"""Encode engine core (vLLM v1's ``EngineCore`` side): image queue, batched vision forward,
feature pool, per-request failure state. No sockets, Redis or protobuf: the process
(``services/encoder/proc.py``) converts messages to the records of ``services/encoder/records.py``
and publishes what the outputs say.

Lifecycle of one image: added (a pool hit is ready at once) ▸ decoded ▸ queued ▸ encoded in a
batch of up to ``max_images`` images and ``max_patches`` patches ▸ written into the pool
(leased until the request's deadline) ▸ ready.

``EncodeEngine.step()`` = take the oldest queued images within the budgets ▸ fail those past
their deadline ▸ one vision forward ▸ pool ▸ outputs (with the hits found since the last step).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch
from PIL import Image

from epd.engine.region_alloc import RegionFull
from epd.models.qwen2_vl import Qwen2VLAdapter
from services.encoder.core import FeaturePool, ImageDecodeError, decode_image
from services.encoder.records import EncodeFailure, EncodeOutputs, EncodeRequest, EncoderLoad, FeaturesOut, ImageInput

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 40_000_000
# the per-batch timing line (INFO); epd profile's deployment probe reads it back (epd.plan.frontend)
ENCODED_MSG = "encoded %d image(s) in %.1f ms"
_FAILED_MAX = 10_000  # failed request ids remembered (then forgotten all at once)


@dataclass
class _Job:
    request: EncodeRequest
    item: ImageInput
    image: Image.Image


class EncodeEngine:
    """Batched vision encoding into a feature pool.

    Args:
        adapter: the loaded model (vision part).
        region: uint8 tensor the pool lives in (the transfer-registered region in a deployment).
        max_images: images per forward (``EPD_ENCODER_MAX_IMAGES``).
        max_patches: vision patches per forward (``EPD_ENCODER_MAX_PATCHES``); an image larger
            than that runs alone.
        max_pixels: larger images fail with ``INVALID_REQUEST`` before they are decoded.
    """

    def __init__(self, adapter: Qwen2VLAdapter, region: torch.Tensor, max_images: int, max_patches: int,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.adapter = adapter
        self.max_images, self.max_patches, self.max_pixels = max_images, max_patches, max_pixels
        self._out = EncodeOutputs()  # outputs since the last step, returned by the next
        self.pool = FeaturePool(region, on_evict=lambda mm_hash: self._out.evicted.append(mm_hash))
        self.queue: deque[_Job] = deque()
        self.failed: set[str] = set()  # failed request ids: no second failure, their jobs skipped
        self._batch: list[_Job] = []  # the batch a step is encoding (failed if the step raises)

    # -- input ------------------------------------------------------------------------
    def add(self, req: EncodeRequest) -> None:
        """Queue the request's images; pooled ones are ready at the next step without encoding.
        An image that cannot be decoded fails the whole request (``INVALID_REQUEST``)."""
        jobs = []
        for item in req.images:
            hit = self.pool.lookup(item.mm_hash, req.deadline)
            if hit is not None:  # leased until the deadline: not evictable while prefill reads it
                logger.info("request %s: image %d cache hit %s", req.request_id, item.index, item.mm_hash[:12])
                self._out.ready.append(FeaturesOut(req, item.index, hit, cached=True))
                continue
            try:
                image = item.image if item.image is not None else self._decode(item)
            except ImageDecodeError as exc:
                self.fail(req, "INVALID_REQUEST", f"image {item.index}: {exc}")
                return
            jobs.append(_Job(req, item, image))
        self.queue.extend(jobs)

    def _decode(self, item: ImageInput) -> Image.Image:
        if item.data is None:
            raise ImageDecodeError(f"image {item.index}: missing media frame")
        return decode_image(item.data, self.max_pixels)

    def abort(self, request_id: str) -> bool:
        """Drop the request's queued images and unsent hits. Returns whether any were held."""
        before = len(self.queue) + len(self._out.ready)
        self._forget(request_id)
        return len(self.queue) + len(self._out.ready) < before

    def fail(self, req: EncodeRequest, code: str, message: str, peer: str = "") -> None:
        """Fail ``req`` (once: later failures of the same id are ignored); its queued images are dropped."""
        if req.request_id in self.failed:
            return
        if len(self.failed) >= _FAILED_MAX:
            self.failed.clear()
        self.failed.add(req.request_id)
        self._forget(req.request_id)
        self._out.failed.append(EncodeFailure(req, code, message, peer))

    def _forget(self, request_id: str) -> None:
        self.queue = deque(j for j in self.queue if j.request.request_id != request_id)
        self._out.ready = [r for r in self._out.ready if r.request.request_id != request_id]

    def has_queued(self, request_id: str) -> bool:
        """Whether images of the request are still waiting to be encoded."""
        return any(j.request.request_id == request_id for j in self.queue)

    # -- step -------------------------------------------------------------------------
    def step(self, now: float | None = None) -> EncodeOutputs:
        """Encode one batch (see the module docstring); ``now`` is unix seconds (default: the clock)."""
        if self.queue:
            self._encode_batch(time.time() if now is None else now)
        return self.take_outputs()

    def _encode_batch(self, now: float) -> None:
        batch = self._batch = self._take_batch()
        live = []
        for job in batch:
            if job.request.deadline < now:
                self.fail(job.request, "TIMEOUT", "encode queue timeout")
            elif job.request.request_id not in self.failed:
                live.append(job)
        if not live:
            self._batch = []
            return
        t0 = time.perf_counter()
        try:
            outputs = self.adapter.encode([j.image for j in live])
        except Exception as exc:
            logger.exception("encode batch failed")
            for job in live:
                self.fail(job.request, "INTERNAL", f"encoder error: {exc}")
            self._batch = []
            return
        logger.info(ENCODED_MSG, len(live), (time.perf_counter() - t0) * 1e3)
        for job, (features, grid) in zip(live, outputs, strict=True):
            try:
                entry = self.pool.put(job.item.mm_hash, features, list(grid), job.request.deadline)
            except RegionFull as exc:
                self.fail(job.request, "OUT_OF_CAPACITY", f"feature pool full: {exc}")
                continue
            self._out.ready.append(FeaturesOut(job.request, job.item.index, entry))
        self._batch = []

    def _take_batch(self) -> list[_Job]:
        """Oldest queued images within the image and patch budgets (at least one)."""
        batch: list[_Job] = []
        patches = 0
        while self.queue and len(batch) < self.max_images:
            cost = self.queue[0].item.patches
            if batch and patches + cost > self.max_patches:
                break
            batch.append(self.queue.popleft())
            patches += cost
        return batch

    def take_outputs(self) -> EncodeOutputs:
        """The outputs produced since the last step, without doing any work."""
        out, self._out = self._out, EncodeOutputs()
        out.busy = bool(self.queue)
        out.load = self.load()
        return out

    def fail_step(self, exc: Exception) -> EncodeOutputs:
        """A :meth:`step` raised: fail the requests of the batch it was encoding (``INTERNAL``)."""
        batch, self._batch = self._batch, []
        for job in batch:
            self.fail(job.request, "INTERNAL", f"encoder: step failed: {type(exc).__name__}: {exc}")
        return self.take_outputs()

    def fail_all(self, code: str, message: str) -> EncodeOutputs:
        """Fail every queued request and empty the pool (shutdown)."""
        for job in list(self.queue):
            self.fail(job.request, code, message)
        self._out.evicted.extend(self.pool.clear())
        return self.take_outputs()

    def load(self) -> EncoderLoad:
        """The load record (safe to call from another thread: reads only)."""
        jobs = list(self.queue)
        return EncoderLoad(
            queued_images=len(jobs),
            queued_patches=sum(j.item.grid_thw[1] * j.item.grid_thw[2] for j in jobs if j.item.grid_thw),
            pool_entries=len(self.pool),
            pool_used_bytes=self.pool.used_bytes,
        )
