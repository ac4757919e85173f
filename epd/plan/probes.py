"""Model-free measurements for ``epd profile`` (:mod:`epd.plan.profiler`): the timing helper, the
seeded sample photographs, one-sided transfer costs and the host's front-end and control-plane
costs. :mod:`epd.plan.parallel` uses the sample photographs too.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from epd.plan.profile import transfer_x

ENCODE_SIZES = ((224, 224), (448, 448), (802, 652), (1280, 720))
TRANSFER_SIZES = (4 << 10, 64 << 10, 1 << 20, 8 << 20, 32 << 20)


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else ``platform.processor()``, else ``cpu``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def timed(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def sample_images(seed: int) -> dict[tuple[int, int], tuple[object, bytes]]:
    """One seeded photograph per size in :data:`ENCODE_SIZES`: ``(PIL image, JPEG bytes)``."""
    from epd.bench.workloads import jpeg_data_url, make_image

    rng = random.Random(seed)
    out = {}
    for i, (w, h) in enumerate(ENCODE_SIZES):
        img = make_image(rng, w, h, i + 1)
        url, _ = jpeg_data_url(img)
        out[(w, h)] = (img, base64.b64decode(url.split(",", 1)[1]))
    return out


def measure_transfer(backend: str, reps: int) -> list[dict]:
    """One-sided writes of :data:`TRANSFER_SIZES` bytes between two regions of ``backend``
    (``mooncake`` | ``shm``): one ``{"x", "s", "what"}`` sample per size, ``s`` the median
    seconds of ``reps + 2`` writes.

    Raises:
        ValueError: an unknown backend; the backend's own error when it cannot start (e.g. Mooncake
            without ``libibverbs``).
    """
    from epd.transfer import create_backend

    samples = []
    biggest = max(TRANSFER_SIZES)
    with create_backend(backend, timeout_s=60) as src, create_backend(backend, timeout_s=60) as dst:
        local = src.allocate(biggest, "profile-src")
        remote = dst.allocate(biggest, "profile-dst")
        for n in TRANSFER_SIZES:
            secs = timed(lambda n=n: src.write(local, remote.handle, [0], [0], [n]), reps + 2)
            samples.append({"x": transfer_x(n), "s": secs, "what": f"{n} B"})
    return samples


def measure_host(model_dir: Path, images: dict[tuple[int, int], tuple[object, bytes]],
                 reps: int) -> dict[str, float]:
    """Front-end and control-plane costs (single-threaded Python; threads do not matter).

    Args:
        model_dir: the model directory (its tokenizer and chat template).
        images: :func:`sample_images` (the 802×652 JPEG is the request's image).
        reps: timed runs per measurement (median).

    Returns:
        ``request_s`` (chat template + tokenization of one request), ``request_mbyte_s``
        (JSON + base64 + sha256 + header read, per MB of image), ``token_s`` (one TokenDelta
        hop + incremental detokenization + an SSE chunk), ``hop_s`` (one control message over a
        loopback ZeroMQ PUSH/PULL pair), ``jpeg_bytes_per_pixel`` of the sample photos; seconds.
    """
    import zmq
    from tokenizers.decoders import DecodeStream
    from transformers import AutoTokenizer

    from epd.wire.codec import pack, unpack
    from epd.wire.gen import epd_pb2 as pb

    tok = AutoTokenizer.from_pretrained(model_dir)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    msg = pb.TokenDelta(request_id="r-000000000000", token_ids=[123], stage="decode", offset=5)
    n = 500

    def hop():
        for _ in range(n):
            push.send_multipart([pack(msg, "decode-0")])
            unpack(pull.recv_multipart()[0])

    hop_s = timed(hop, 2) / n
    ids = tok("the quick brown fox jumps over the lazy dog " * 20, add_special_tokens=False)["input_ids"]

    def tokens():
        stream = DecodeStream(skip_special_tokens=True)
        for i in range(n):
            push.send_multipart([pack(msg, "decode-0")])
            unpack(pull.recv_multipart()[0])
            piece = stream.step(tok._tokenizer, ids[i % len(ids)]) or ""
            chunk = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                                "model": "m", "choices": [{"index": 0, "delta": {"content": piece},
                                                           "finish_reason": None}]})
            json.loads(f"data: {chunk}\n\n"[6:].strip())

    token_s = timed(tokens, 2) / n
    push.close(0)
    pull.close(0)
    ctx.term()
    raw = images[(802, 652)][1]
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(raw).decode()}},
        {"type": "text", "text": "describe the picture in a few words"}]}], "max_tokens": 64})
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the picture"}]}]

    def request_fixed():
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        tok(text, add_special_tokens=False)

    def request_bytes():
        obj = json.loads(body)
        data = base64.b64decode(obj["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)[1])
        hashlib.sha256(data).hexdigest()
        from PIL import Image

        Image.open(io.BytesIO(data)).size  # noqa: B018 (header only, as the gateway)

    request_s = timed(request_fixed, reps + 2)
    request_mbyte_s = timed(request_bytes, reps + 2) / (len(raw) / 1e6)
    bpp = statistics.mean(len(b) / (w * h) for (w, h), (_, b) in images.items())
    return {"request_s": request_s, "request_mbyte_s": request_mbyte_s, "token_s": token_s,
            "hop_s": hop_s, "jpeg_bytes_per_pixel": bpp}
