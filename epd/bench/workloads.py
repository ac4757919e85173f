"""Seeded request workloads for ``epd bench serve`` (``--dataset-name``).

Every generator returns a list of :class:`BenchRequest`; the same arguments and seed give the
same list, byte for byte (images included). Images are real photographs from scikit-image's
bundled data set, cropped to the bucket's aspect ratio at a seeded offset and resized to the
bucket's size, then JPEG-encoded once, before the run, so the client does no image work while
it measures. Each generated image is made unique (a seeded crop plus a one-pixel stamp of its
index) so that, unless ``--image-reuse`` asks for repeats, no request can hit a server's
multimodal cache.

Workloads:

- ``random-mm`` — ``vllm bench serve``'s knobs: input/output length with a range ratio, images
  per request as a base count with a range ratio (capped by ``--random-mm-limit-mm-per-prompt``),
  image-size buckets ``{(H, W, 1): probability}``.
- ``epd-synthetic`` — EPD Disaggregation (Singh et al., ICML 2025, §5): a ~22-token prompt,
  10 output tokens, ``--epd-images`` images per request (the paper sweeps 2/4/6/8).
- ``sharegpt4o-like`` — EPD-Serve's ShareGPT-4o shape: one image per request, sizes around an
  average of 802×652, ~10 text tokens, 64 output tokens.
- ``visualwebinstruct-like`` — EPD-Serve's VisualWebInstruct shape: half the requests text-only,
  the rest one 1280×720 image, ~63 text tokens, 64 output tokens.
- ``jsonl`` — a user's file, one JSON object per line: ``{"prompt": str, "images": [path | URL],
  "max_tokens": int}`` (``text`` is accepted for ``prompt``; paths are relative to the file).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parents[1] / "models" / "corpus"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
DATASETS = ("random-mm", "epd-synthetic", "sharegpt4o-like", "visualwebinstruct-like", "jsonl")


class WorkloadError(ValueError):
    """A workload cannot be built from the given arguments (bad flag value, unreadable file)."""


@dataclass
class BenchRequest:
    """One request of a workload.

    Attributes:
        prompt: the user text (after the images in the message).
        images: image URLs as sent (``data:image/jpeg;base64,…`` for generated or local images).
        max_tokens: output tokens asked for.
        prompt_len: text tokens of ``prompt`` by the workload's tokenizer (words when it has none).
        image_sizes: ``(width, height)`` in pixels per image; ``None`` for a URL we did not open.
        image_keys: a content key per image (sha1 of its bytes); equal keys = a repeated image.
    """

    prompt: str
    images: list[str] = field(default_factory=list)
    max_tokens: int = 64
    prompt_len: int = 0
    image_sizes: list[tuple[int, int] | None] = field(default_factory=list)
    image_keys: list[str] = field(default_factory=list)


@dataclass
class WorkloadArgs:
    """What shapes a workload (the ``epd bench serve`` flags that are not about arrivals)."""

    dataset_name: str = "random-mm"
    num_prompts: int = 100
    seed: int = 0
    tokenizer: str | None = None  # a local tokenizer/model directory; None: one word = one token
    random_input_len: int = 64
    random_output_len: int = 64
    random_range_ratio: float = 0.0
    random_mm_base_items_per_request: int = 1
    random_mm_num_mm_items_range_ratio: float = 0.0
    random_mm_limit_mm_per_prompt: int = 255
    random_mm_bucket_config: str = "{(256, 256, 1): 0.5, (720, 1280, 1): 0.5}"
    epd_images: int = 4
    image_reuse: float = 0.0
    output_len: int | None = None  # overrides the dataset's own output length
    dataset_path: str | None = None
    image_salt: int = 0  # changes what every generated image shows (its crop), nothing else


_photo_cache: dict[str, object] = {}


def photo(name: str):
    """A bundled scikit-image photograph as an RGB ``PIL.Image`` (cached).

    Raises:
        WorkloadError: scikit-image is missing (install the ``[bench]`` extra).
    """
    if name not in _photo_cache:
        try:
            from skimage import data
        except ImportError as exc:
            raise WorkloadError("image workloads need scikit-image: pip install 'epd-serve[bench]'") from exc
        from PIL import Image

        _photo_cache[name] = Image.fromarray(getattr(data, name)()).convert("RGB")
    return _photo_cache[name]


def make_image(rng: random.Random, width: int, height: int, stamp: int):
    """A ``width``×``height`` RGB crop of a random photograph, unique by ``stamp``.

    The crop has the target aspect ratio, covers 60–100 % of the photo's limiting side at a
    random offset, and is resized with Lanczos; pixel (0, 0) then encodes ``stamp``.
    """
    from PIL import Image

    src = photo(rng.choice(PHOTOS))
    sw, sh = src.size
    aspect = width / height
    frac = rng.uniform(0.6, 1.0)
    cw = min(sw, sh * aspect) * frac
    ch = cw / aspect
    x0 = rng.uniform(0, sw - cw)
    y0 = rng.uniform(0, sh - ch)
    img = src.resize((width, height), Image.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
    img.putpixel((0, 0), (stamp & 0xFF, (stamp >> 8) & 0xFF, (stamp >> 16) & 0xFF))
    return img


def jpeg_data_url(img) -> tuple[str, str]:
    """``(data URL, sha1 key)`` of ``img`` as a quality-92 JPEG."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    raw = buf.getvalue()
    return "data:image/jpeg;base64," + base64.b64encode(raw).decode(), hashlib.sha1(raw).hexdigest()


class TextSource:
    """Prompt text of a given token length, cut from the bundled corpus at a seeded offset.

    With a tokenizer (a local directory holding ``tokenizer.json``) lengths are exact in its
    tokens; without one, a length counts whitespace-separated words.
    """

    def __init__(self, tokenizer: str | None) -> None:
        self.words = " ".join(p.read_text() for p in sorted(CORPUS_DIR.glob("*.txt"))).split()
        self.tok = None
        if tokenizer:
            path = Path(tokenizer)
            if not (path / "tokenizer.json").is_file():
                raise WorkloadError(f"--tokenizer {tokenizer}: no tokenizer.json in that directory")
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))

    def count(self, text: str) -> int:
        """Tokens (or words) in ``text``."""
        if self.tok is None:
            return len(text.split())
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    def sample(self, rng: random.Random, n_tokens: int) -> tuple[str, int]:
        """``(text, its length)``: ``n_tokens`` tokens (≥ 1) starting at a random corpus word."""
        n_tokens = max(1, n_tokens)
        start = rng.randrange(len(self.words))
        words = [self.words[(start + i) % len(self.words)] for i in range(n_tokens + 8)]
        if self.tok is None:
            text = " ".join(words[:n_tokens])
            return text, n_tokens
        ids = self.tok.encode(" ".join(words), add_special_tokens=False).ids[:n_tokens]
        text = self.tok.decode(ids).strip()
        return text, self.count(text)


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    """vLLM's range-ratio length: uniform integer in ``[mean·(1-ratio), mean·(1+ratio)]``, ≥ 1."""
    lo, hi = math.floor(mean * (1 - ratio)), math.ceil(mean * (1 + ratio))
    return max(1, rng.randint(lo, hi))


def parse_buckets(spec: str) -> list[tuple[tuple[int, int], float]]:
    """``"{(H, W, 1): p, …}"`` (vLLM's ``--random-mm-bucket-config``) → ``[((W, H), p), …]``, p normalised.

    Raises:
        WorkloadError: not a dict of ``(H, W, T)`` → probability, ``T != 1`` (video), or p ≤ 0 in all.
    """
    try:
        raw = ast.literal_eval(spec) if isinstance(spec, str) else spec
    except (ValueError, SyntaxError) as exc:
        raise WorkloadError(f"--random-mm-bucket-config {spec!r}: not a dict literal ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise WorkloadError(f"--random-mm-bucket-config {spec!r}: expected {{(H, W, 1): probability, ...}}")
    out = []
    for key, p in raw.items():
        if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(v, int) and v > 0 for v in key)):
            raise WorkloadError(f"--random-mm-bucket-config: bucket {key!r} is not (height, width, frames)")
        if key[2] != 1:
            raise WorkloadError(f"--random-mm-bucket-config: bucket {key!r} is a video (frames > 1); images only")
        if not isinstance(p, (int, float)) or p < 0:
            raise WorkloadError(f"--random-mm-bucket-config: probability {p!r} of {key!r} must be ≥ 0")
        out.append(((key[1], key[0]), float(p)))
    total = sum(p for _, p in out)
    if total <= 0:
        raise WorkloadError("--random-mm-bucket-config: the probabilities sum to 0")
    return [(size, p / total) for size, p in out]


class _Images:
    """Generates unique images and applies ``--image-reuse`` (a request repeats earlier images).

    Which requests repeat is drawn from ``seed`` alone; what the images show (photo, crop) from
    ``seed`` and ``salt``, so two salts give the same workload shape with different image bytes.
    Uniqueness is checked on the encoded bytes (servers hash those: our ``mm_hash`` is their
    sha256): JPEG can swallow the one-pixel stamp, so a repeat is redrawn.
    """

    def __init__(self, seed: int, reuse: float, salt: int = 0) -> None:
        self.rng = random.Random(seed)
        self.crops = random.Random(f"{seed}/{salt}")
        self.reuse = reuse
        self.pool: list[tuple[str, str, tuple[int, int]]] = []  # (url, key, size)
        self.keys: set[str] = set()
        self.n = 0

    def _new(self, w: int, h: int) -> tuple[str, str, tuple[int, int]]:
        for _ in range(100):
            self.n += 1
            url, key = jpeg_data_url(make_image(self.crops, w, h, self.n))
            if key not in self.keys:
                self.keys.add(key)
                return url, key, (w, h)
        raise WorkloadError(f"cannot make a new {w}x{h} image (100 draws repeated earlier ones)")

    def for_request(self, sizes: list[tuple[int, int]]) -> tuple[list[str], list[str], list]:
        """URLs, keys and sizes for one request asking for images of ``sizes`` (W, H)."""
        if sizes and self.pool and self.rng.random() < self.reuse:
            picked = [self.rng.choice(self.pool) for _ in sizes]
        else:
            picked = [self._new(w, h) for w, h in sizes]
            self.pool.extend(picked)
        return [p[0] for p in picked], [p[1] for p in picked], [p[2] for p in picked]


def build_workload(args: WorkloadArgs) -> list[BenchRequest]:
    """The requests of ``args.dataset_name`` for ``args.seed`` (deterministic).

    Raises:
        WorkloadError: an unknown dataset, a bad knob, or (``jsonl``) an unreadable file, a bad
            line or a missing image file — the message names the line.
    """
    if args.num_prompts < 1:
        raise WorkloadError(f"--num-prompts must be ≥ 1 (got {args.num_prompts})")
    if not 0.0 <= args.image_reuse <= 1.0:
        raise WorkloadError(f"--image-reuse must be in [0, 1] (got {args.image_reuse})")
    if not 0.0 <= args.random_range_ratio < 1.0 or not 0.0 <= args.random_mm_num_mm_items_range_ratio <= 1.0:
        raise WorkloadError("range ratios must be in [0, 1)")
    if args.dataset_name == "jsonl":
        return _jsonl(args)
    if args.dataset_name not in DATASETS:
        raise WorkloadError(f"unknown --dataset-name {args.dataset_name!r}; expected one of {', '.join(DATASETS)}")
    rng = random.Random(args.seed)
    text = TextSource(args.tokenizer)
    images = _Images(args.seed + 1, args.image_reuse, args.image_salt)
    buckets = parse_buckets(args.random_mm_bucket_config) if args.dataset_name == "random-mm" else []
    out = []
    for i in range(args.num_prompts):
        if args.dataset_name == "random-mm":
            n_text = _length(rng, args.random_input_len, args.random_range_ratio)
            n_out = _length(rng, args.random_output_len, args.random_range_ratio)
            base, ratio = args.random_mm_base_items_per_request, args.random_mm_num_mm_items_range_ratio
            lo, hi = math.floor(base * (1 - ratio)), math.ceil(base * (1 + ratio))
            n_img = min(max(0, rng.randint(lo, hi)), args.random_mm_limit_mm_per_prompt)
            sizes = [rng.choices([s for s, _ in buckets], [p for _, p in buckets])[0] for _ in range(n_img)]
        elif args.dataset_name == "epd-synthetic":
            n_text, n_out = 22, 10
            sizes = [(448, 448)] * args.epd_images
        elif args.dataset_name == "sharegpt4o-like":
            n_text, n_out = rng.randint(6, 14), 64
            w = 2 * round(rng.uniform(602, 1002) / 2)
            h = 2 * round(rng.uniform(489, 815) / 2)
            sizes = [(w, h)]
        else:  # visualwebinstruct-like
            n_text, n_out = rng.randint(47, 79), 64
            sizes = [(1280, 720)] if i % 2 == 0 else []
        if args.output_len:
            n_out = args.output_len
        prompt, n = text.sample(rng, n_text)
        urls, keys, got = images.for_request(sizes)
        out.append(BenchRequest(prompt, urls, n_out, n, got, keys))
    return out


def _jsonl(args: WorkloadArgs) -> list[BenchRequest]:
    """A user's JSONL file (see the module docstring); cycles when shorter than ``num_prompts``."""
    if not args.dataset_path:
        raise WorkloadError("--dataset-name jsonl needs --dataset-path FILE")
    path = Path(args.dataset_path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise WorkloadError(f"--dataset-path {path}: {exc.strerror or exc}") from None
    text = TextSource(args.tokenizer)
    rows: list[BenchRequest] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{no}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise WorkloadError(f"{path}:{no}: expected an object with prompt, images, max_tokens")
        prompt = obj.get("prompt", obj.get("text"))
        if not isinstance(prompt, str):
            raise WorkloadError(f"{path}:{no}: 'prompt' (or 'text') must be a string")
        max_tokens = obj.get("max_tokens", args.output_len or 64)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise WorkloadError(f"{path}:{no}: 'max_tokens' must be an integer ≥ 1")
        imgs = obj.get("images", [])
        if isinstance(imgs, str):
            imgs = [imgs]
        if not isinstance(imgs, list) or not all(isinstance(x, str) for x in imgs):
            raise WorkloadError(f"{path}:{no}: 'images' must be a list of paths or URLs")
        urls, keys, sizes = [], [], []
        for ref in imgs:
            if ref.startswith(("http://", "https://", "data:")):
                urls.append(ref)
                keys.append(hashlib.sha1(ref.encode()).hexdigest())
                sizes.append(None)
                continue
            file = Path(ref) if Path(ref).is_absolute() else path.parent / ref
            if not file.is_file():
                raise WorkloadError(f"{path}:{no}: image file {ref} not found")
            raw = file.read_bytes()
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(io.BytesIO(raw)) as im:
                    sizes.append(im.size)
                    fmt = (im.format or "png").lower()
            except UnidentifiedImageError:
                raise WorkloadError(f"{path}:{no}: {ref} is not an image") from None
            urls.append(f"data:image/{fmt};base64," + base64.b64encode(raw).decode())
            keys.append(hashlib.sha1(raw).hexdigest())
        rows.append(BenchRequest(prompt, urls, max_tokens, text.count(prompt), sizes, keys))
    if not rows:
        raise WorkloadError(f"{path}: no requests in the file")
    return [rows[i % len(rows)] for i in range(args.num_prompts)]
