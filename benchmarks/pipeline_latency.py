"""One-image request latency through the E→P→D pipeline vs in-process ``model.generate``.

Starts ``epd up`` (embedded Redis, one instance per role) unless ``--url`` points at a
running gateway, sends the same chat request ``--reps`` times (streaming), and reports
TTFT (request sent → first SSE chunk, which the gateway emits on the first token) and
end-to-end latency. The baseline is HF ``generate(do_sample=False)`` of the same weights
in this process: ``max_new_tokens=1`` for its TTFT and ``--max-tokens`` for its total.

    .venv/bin/python benchmarks/pipeline_latency.py --reps 5 --out results/pipeline_latency.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epd.launcher import ensure_model, free_port, gateway_ready  # noqa: E402
from epd.models.hf_reference import hf_inputs, hf_processor  # noqa: E402


def photo():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((448, 448))


def start_server(model: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "EPD_MODEL": str(model), "EPD_GATEWAY_PORT": str(port), "EPD_LOG_LEVEL": "WARNING",
           "EPD_TORCH_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "epd.cli", "up"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if gateway_ready(url, {"encoder": 1, "prefill": 1, "decode": 1}):
            return proc, url
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    raise RuntimeError("epd up did not become healthy")


def timed_stream(url: str, body: dict) -> tuple[float, float, int]:
    """(TTFT s, end-to-end s, completion tokens) of one streaming request."""
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            payload = line[6:]
            if payload != "[DONE]":
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model directory (default: tiny preset)")
    ap.add_argument("--url", default="", help="running gateway (default: start `epd up`)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per service and for the baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/pipeline_latency.json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model_dir = ensure_model(args.model)
    image = photo()
    text = "Describe the picture."

    def body(variant: int) -> dict:
        """The request with pixel (0, 0) set to ``variant``: a new mm_hash, so the encoder's
        feature cache never answers and every request pays for encoding."""
        im = image.copy()
        im.putpixel((0, 0), (variant % 256, variant // 256 % 256, 7))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        url_img = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url_img}},
                                                         {"type": "text", "text": text}]}],
                "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}

    # in-process baseline
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = hf_processor(model_dir)
    inputs = hf_inputs(processor, [image], text)

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - t0

    gen(2)  # warm-up
    base_ttft = [gen(1) for _ in range(args.reps)]
    base_total = [gen(args.max_tokens) for _ in range(args.reps)]

    proc = None
    url = args.url
    if not url:
        proc, url = start_server(model_dir, args.threads)
    try:
        timed_stream(url, body(args.seed * 1000))  # warm-up
        runs = [timed_stream(url, body(args.seed * 1000 + 1 + i)) for i in range(args.reps)]
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)

    def ms(xs):
        return {"mean": 1e3 * statistics.mean(xs), "median": 1e3 * statistics.median(xs), "min": 1e3 * min(xs)}

    result = {
        "model": str(model_dir), "prompt_tokens": int(inputs["input_ids"].shape[1]), "max_tokens": args.max_tokens,
        "reps": args.reps, "threads": args.threads,
        "pipeline": {"ttft_ms": ms([r[0] for r in runs]), "e2e_ms": ms([r[1] for r in runs]),
                     "completion_tokens": runs[-1][2]},
        "in_process_generate": {"ttft_ms": ms(base_ttft), "e2e_ms": ms(base_total)},
    }
    print(f"{'':28s}{'TTFT ms (median)':>18s}{'E2E ms (median)':>18s}")
    print(f"{'E-P-D pipeline (epd up)':28s}{result['pipeline']['ttft_ms']['median']:18.1f}"
          f"{result['pipeline']['e2e_ms']['median']:18.1f}")
    print(f"{'HF generate, in-process':28s}{result['in_process_generate']['ttft_ms']['median']:18.1f}"
          f"{result['in_process_generate']['e2e_ms']['median']:18.1f}")
    print(f"prompt {result['prompt_tokens']} tokens, {args.max_tokens} output tokens, {args.reps} reps, "
          f"{args.threads} thread(s) per process")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
