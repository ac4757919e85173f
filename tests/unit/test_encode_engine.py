"""EncodeEngine in process: add / abort / step outputs, image and patch budgets, pool hits and
evictions, failure codes, load records."""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image

from services.encoder.engine import EncodeEngine
from services.encoder.records import EncodeRequest, ImageInput

HIDDEN = 8


class FakeVision:
    """``encode`` of a toy vision tower: ``width // 8`` rows of the value ``width``; grid (1, 2, width // 4)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail

    def encode(self, images):
        self.calls.append([im.width for im in images])
        if self.fail:
            raise RuntimeError("vision tower exploded")
        return [(torch.full((im.width // 8, HIDDEN), float(im.width)), (1, 2, im.width // 4)) for im in images]


def _png(width: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, 8), (width % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _img(index: int, width: int, grid=(1, 2, 2)) -> ImageInput:
    return ImageInput(index, f"hash-{width}", tuple(grid), data=_png(width))


def _req(rid: str, *images: ImageInput, deadline: float = math.inf) -> EncodeRequest:
    return EncodeRequest(rid, list(images), deadline, ctx=("route", rid))


def _engine(pool_bytes: int = 1 << 16, max_images: int = 8, max_patches: int = 1 << 20, fail: bool = False):
    vision = FakeVision(fail)
    return EncodeEngine(vision, torch.zeros(pool_bytes, dtype=torch.uint8), max_images, max_patches), vision


def test_images_encoded_into_the_pool_then_hits_skip_the_tower():
    engine, vision = _engine()
    engine.add(_req("a", _img(0, 16, (1, 2, 4)), _img(1, 32, (1, 4, 4))))
    load = engine.load()
    assert (load.queued_images, load.queued_patches, load.inflight) == (2, 2 * 4 + 4 * 4, 2)
    out = engine.step()
    assert vision.calls == [[16, 32]] and not out.busy and out.failed == [] and out.evicted == []
    assert [(r.request.request_id, r.index, r.cached) for r in out.ready] == [("a", 0, False), ("a", 1, False)]
    second = out.ready[1].entry
    assert (second.mm_hash, second.offset, second.nbytes, second.shape, second.grid_thw) == (
        "hash-32", 256, 4 * HIDDEN * 4, [4, HIDDEN], [1, 2, 8])
    raw = engine.pool.region[second.offset: second.offset + second.nbytes].view(torch.float32)
    assert torch.equal(raw, torch.full((4 * HIDDEN,), 32.0))
    assert out.ready[0].request.ctx == ("route", "a")
    assert (out.load.queued_images, out.load.pool_entries, out.load.pool_used_bytes) == (0, 2, 512)

    engine.add(_req("b", _img(0, 32)))  # same mm_hash: answered from the pool
    assert engine.load().queued_images == 0
    out = engine.step()
    assert [(r.request.request_id, r.cached, r.entry.offset) for r in out.ready] == [("b", True, 256)]
    assert vision.calls == [[16, 32]]


@pytest.mark.parametrize("max_images, max_patches, batches", [
    (2, 1 << 20, [[8, 16], [24]]),
    (8, 10, [[8, 16], [24]]),  # 4 + 4 patches fit 10, + 4 more do not
    (8, 3, [[8], [16], [24]]),  # an image over the budget still runs alone
])
def test_batches_respect_image_and_patch_budgets(max_images, max_patches, batches):
    engine, vision = _engine(max_images=max_images, max_patches=max_patches)
    engine.add(_req("a", _img(0, 8), _img(1, 16), _img(2, 24)))
    busy = [engine.step().busy for _ in batches]
    assert vision.calls == batches and busy == [True] * (len(batches) - 1) + [False]


def test_abort_drops_queued_images_and_unsent_hits():
    engine, vision = _engine()
    engine.add(_req("a", _img(0, 16)))
    engine.step()
    engine.add(_req("b", _img(0, 16), _img(1, 24)))  # a hit and a queued image
    assert engine.has_queued("b") and engine.abort("b") and not engine.abort("b")
    out = engine.step()
    assert out.ready == [] and out.failed == [] and out.load.inflight == 0 and vision.calls == [[16]]


def test_bad_images_fail_the_request_once_with_invalid_request():
    engine, _ = _engine()
    engine.add(_req("a", _img(0, 16), ImageInput(1, "h", (1, 2, 2), data=b"not an image")))
    engine.add(_req("b", ImageInput(0, "h2", (1, 2, 2), data=None)))
    out = engine.step()
    assert [(f.request.request_id, f.code) for f in out.failed] == [("a", "INVALID_REQUEST"), ("b", "INVALID_REQUEST")]
    assert out.failed[0].message.startswith("image 1: cannot decode image")
    assert out.failed[1].message == "image 0: image 0: missing media frame"
    assert out.ready == [] and out.load.queued_images == 0
    engine.fail(out.failed[0].request, "INTERNAL", "again")  # a request fails once
    assert engine.step().failed == []


def test_timeout_tower_error_and_full_pool_codes():
    engine, _ = _engine()
    engine.add(_req("late", _img(0, 16), deadline=100.0))
    [failure] = engine.step(now=200.0).failed
    assert (failure.code, failure.message) == ("TIMEOUT", "encode queue timeout")

    engine, _ = _engine(fail=True)
    engine.add(_req("a", _img(0, 16)))
    [failure] = engine.step().failed
    assert (failure.code, failure.message) == ("INTERNAL", "encoder error: vision tower exploded")

    engine, _ = _engine(pool_bytes=256)
    engine.add(_req("a", _img(0, 64)))  # 8 rows x 8 x 4 B = 256 B: fits exactly
    engine.add(_req("b", _img(0, 56)))  # 224 B; the leased "a" cannot be evicted
    out = engine.step()
    assert [r.request.request_id for r in out.ready] == ["a"]
    assert [(f.request.request_id, f.code) for f in out.failed] == [("b", "OUT_OF_CAPACITY")]
    assert out.failed[0].message.startswith("feature pool full")


def test_expired_leases_are_evicted_and_reported_before_ready():
    engine, _ = _engine(pool_bytes=256)
    engine.add(_req("a", _img(0, 64), deadline=1.0))  # leased until 1970: evictable at once
    engine.step(now=0.0)
    engine.add(_req("b", _img(0, 56)))
    out = engine.step()
    assert out.evicted == ["hash-64"] and [r.entry.mm_hash for r in out.ready] == ["hash-56"]


def test_fail_step_and_fail_all():
    engine, _ = _engine()
    engine.add(_req("a", _img(0, 16)))
    engine._batch = list(engine.queue)  # as if a step raised while encoding it
    [failure] = engine.fail_step(ValueError("boom")).failed
    assert (failure.code, failure.message) == ("INTERNAL", "encoder: step failed: ValueError: boom")

    engine.add(_req("b", _img(0, 24)))
    engine.step()
    engine.add(_req("c", _img(0, 32)))
    out = engine.fail_all("UNAVAILABLE", "shutting down")
    assert [(f.request.request_id, f.code) for f in out.failed] == [("c", "UNAVAILABLE")]
    assert out.evicted == ["hash-24"] and out.load.pool_entries == 0 and out.load.queued_images == 0
