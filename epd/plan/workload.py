"""The simulator's view of an ``epd bench serve`` workload: the same generators, flags and
seeds (:func:`epd.bench.workloads.build_workload`), reduced to what costs time — prompt
tokens as the gateway builds them (chat template + text + each image's placeholder run),
images' patch grids, source pixels, JPEG bytes and content keys, and output tokens — plus
the same arrival times (:func:`epd.bench.client.arrival_times`).

Building a workload for the simulator skips the photographs' pixels: the generators draw
image *sizes* and *which requests repeat an image* from RNGs that do not depend on image
content (``_Images`` keeps the crop RNG apart), so :func:`shapes` replaces the image
rendering and JPEG encoding with stand-ins and gets the same shapes in milliseconds
(checked against the real generator in ``tests/unit/test_plan.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from epd.bench import workloads as wl
from epd.bench.workloads import BenchRequest, WorkloadArgs, build_workload


@dataclass(frozen=True)
class SimImage:
    """One image of a request.

    Attributes:
        tokens: LLM tokens (feature rows) after Qwen2-VL's resize.
        patches: ViT patches (``tokens · merge²``).
        src_pixels: pixels of the image as sent (the processor resizes from these).
        jpeg_bytes: bytes of the file as sent (estimated from the pixels for generated images).
        key: content key; equal keys are the same image (the feature cache's ``mm_hash``).
    """

    tokens: int
    patches: int
    src_pixels: int
    jpeg_bytes: int
    key: str


@dataclass(frozen=True)
class SimRequest:
    """One request: ``prompt_len`` text tokens (as the bench counts them), ``prompt_tokens`` of
    the whole prompt prefill runs on, ``max_tokens`` generated (runs use ``--ignore-eos``)."""

    index: int
    prompt_len: int
    prompt_tokens: int
    max_tokens: int
    images: tuple[SimImage, ...] = ()


@dataclass
class SimWorkload:
    """The requests plus the arrival settings (rate, burstiness, seed) of the bench flags."""

    requests: list[SimRequest]
    dataset_name: str = ""
    request_rate: float = float("inf")
    burstiness: float = 1.0
    seed: int = 0
    max_concurrency: int | None = None
    args: WorkloadArgs | None = None
    extra: dict = field(default_factory=dict)

    def extended(self, n: int) -> SimWorkload:
        """The workload cycled to ``n`` requests (repeats get fresh image keys, so the cache sees
        only the reuse the generator drew), for runs that must last long enough at high rates."""
        if n <= len(self.requests):
            return self
        base = self.requests
        reqs = list(base)
        for i in range(len(base), n):
            r = base[i % len(base)]
            cycle = i // len(base)
            images = tuple(SimImage(im.tokens, im.patches, im.src_pixels, im.jpeg_bytes, f"{im.key}/{cycle}")
                           for im in r.images)
            reqs.append(SimRequest(i, r.prompt_len, r.prompt_tokens, r.max_tokens, images))
        return SimWorkload(reqs, self.dataset_name, self.request_rate, self.burstiness, self.seed,
                           self.max_concurrency, self.args, dict(self.extra))

    def arrivals(self, rate: float | None = None):
        """Send offsets (s) at ``rate`` (default: the workload's), as ``epd bench serve`` draws them."""
        from epd.bench.client import arrival_times

        return arrival_times(len(self.requests), self.request_rate if rate is None else rate, self.burstiness,
                             self.seed)


@contextlib.contextmanager
def _sizes_only():
    """Stand-ins for the image rendering and JPEG encoding inside :mod:`epd.bench.workloads`:
    each "image" keeps only its size, each key is fresh (as the real generator guarantees)."""
    counter = itertools.count()
    real_make, real_jpeg = wl.make_image, wl.jpeg_data_url

    class _Sized:
        def __init__(self, w: int, h: int) -> None:
            self.size = (w, h)

    def make_image(rng, width, height, stamp):
        return _Sized(width, height)

    def jpeg_data_url(img):
        return "data:image/jpeg;base64,", f"sim-{next(counter)}"

    wl.make_image, wl.jpeg_data_url = make_image, jpeg_data_url
    try:
        yield
    finally:
        wl.make_image, wl.jpeg_data_url = real_make, real_jpeg


def shapes(args: WorkloadArgs) -> list[BenchRequest]:
    """:func:`build_workload` without pixels (see the module docstring); ``jsonl`` reads the file."""
    if args.dataset_name == "jsonl":
        return build_workload(args)
    with _sizes_only():
        return build_workload(args)


def to_sim(prof, reqs: list[BenchRequest]) -> list[SimRequest]:
    """Bench requests → :class:`SimRequest` with the profile's model geometry and template."""
    m = prof.model
    bpp = prof.host.get("jpeg_bytes_per_pixel", 0.3)
    out = []
    for i, r in enumerate(reqs):
        images = []
        for size, key in zip(r.image_sizes, r.image_keys, strict=True):
            w, h = size or (448, 448)  # a remote URL we did not open: a typical size
            tokens, patches = prof.image_tokens(w, h)
            images.append(SimImage(tokens, patches, w * h, int(w * h * bpp), key))
        prompt = r.prompt_len + m["template_tokens"] + sum(im.tokens + m["image_wrap_tokens"] for im in images)
        out.append(SimRequest(i, r.prompt_len, prompt, r.max_tokens, tuple(images)))
    return out


def sim_workload(prof, args: argparse.Namespace) -> SimWorkload:
    """The workload of ``epd plan``'s bench-style flags on the profile's model."""
    from epd.bench.serve import workload_args

    model_dir = prof.model.get("path")
    wargs = workload_args(args, model_dir if model_dir and Path(model_dir).is_dir() else None)
    reqs = to_sim(prof, shapes(wargs))
    return SimWorkload(reqs, wargs.dataset_name, args.request_rate, args.burstiness, args.seed,
                       args.max_concurrency, wargs)
