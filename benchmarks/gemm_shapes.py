"""What a new GEMM row count costs in bf16 on a CPU, what the row buckets save, and what
``EPD_BATCH_INVARIANT`` costs (README "Dtype": "On AMX CPUs").

oneDNN generates its bf16 kernels per GEMM shape at run time. This measures, in one process at
one thread (a service's share on 2 cores):

- **prefill**: ``Qwen2VLRunner.prefill`` of one prompt at a warm length, then at ``--lengths``
  new lengths (first sight and a second pass), with the row buckets (``epd.models.buckets``) and
  without them;
- **encode**: ``Qwen2VLAdapter.encode`` of one seeded image at a warm size, then at new widths,
  with and without the buckets;
- **batch-invariant mode**: the warm costs above and the decode step's linear layers (batch 4
  and 32) with every linear on fixed 64-row GEMMs, against the default.

Prints a table and writes ``--out`` JSON. On float32 or a non-CPU device the buckets are off by
design, so the two columns match.

    .venv/bin/python benchmarks/gemm_shapes.py --model ~/.cache/epd-serve/models/tiny-seed0 \\
        --out docs/bench/gemm-shapes-tiny.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import epd.models.qwen2_runner as runner_mod  # noqa: E402
import epd.models.qwen2_vl as adapter_mod  # noqa: E402
from epd.hardware import cpu_bf16_flags  # noqa: E402
from epd.models.buckets import make_batch_invariant, padded_rows  # noqa: E402
from epd.models.qwen2_runner import Qwen2VLRunner  # noqa: E402
from epd.models.qwen2_vl import Qwen2VLAdapter  # noqa: E402


def _ms(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1e3


def _buckets(on: bool) -> None:
    fn = padded_rows if on else (lambda n, _dtype, _device: n)
    runner_mod.padded_rows = adapter_mod.padded_rows = fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", type=int, default=40, help="new prefill lengths per pass")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    adapter = Qwen2VLAdapter.load(args.model, dtype=dtype)
    runner = Qwen2VLRunner(adapter)
    rng = np.random.default_rng(0)
    hidden = adapter.hidden_size

    def prefill(n: int) -> float:
        embeds = torch.randn(n, hidden).to(dtype)
        return _ms(runner.prefill, embeds, torch.arange(n)[None].expand(3, -1), [n])

    def image(width: int):
        from PIL import Image

        return Image.fromarray(rng.integers(0, 255, (448, width, 3), dtype=np.uint8))

    def median_of(fn, *a) -> float:
        return statistics.median(fn(*a) for _ in range(args.reps))

    warm_img = image(448)
    rows: dict[str, dict] = {}
    start = 301
    for label, on in (("unpadded", False), ("buckets", True)):
        _buckets(on)
        for _ in range(3):
            prefill(280)
            adapter.encode([warm_img])
        lengths = range(start, start + args.lengths)
        start += args.lengths  # each variant meets lengths neither has seen
        widths = [448 + 28 * i for i in range(1, 11)] if label == "unpadded" else [476 + 28 * i + 14 for i in range(10)]
        imgs = [image(w) for w in widths]
        rows[label] = {
            "prefill_warm_ms": median_of(prefill, 280),
            "prefill_new_first_ms": statistics.median(prefill(n) for n in lengths),
            "prefill_new_second_ms": statistics.median(prefill(n) for n in lengths),
            "encode_warm_ms": median_of(lambda: _ms(adapter.encode, [warm_img])),
            "encode_new_first_ms": statistics.median(_ms(adapter.encode, [im]) for im in imgs),
            "encode_new_second_ms": statistics.median(_ms(adapter.encode, [im]) for im in imgs),
        }

    def decode_linears(batch: int) -> float:
        x = torch.randn(batch, hidden).to(dtype)

        def run():
            for layer in runner.layers:
                attn = layer.self_attn
                attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(x), layer.mlp(x)
            runner.lm_head(x)

        run()
        return median_of(lambda: _ms(run))

    for label in ("default", "batch_invariant"):
        if label == "batch_invariant":
            make_batch_invariant(adapter.model, dtype, adapter.device)
        for _ in range(3):
            prefill(288), adapter.encode([warm_img])
        rows.setdefault(label, {}).update({
            "prefill_288_ms": median_of(prefill, 288),
            "encode_warm_ms": median_of(lambda: _ms(adapter.encode, [warm_img])),
            "decode_linears_b4_ms": decode_linears(4),
            "decode_linears_b32_ms": decode_linears(32),
        })
    result = {"model": str(args.model), "dtype": args.dtype, "threads": 1, "cpu_bf16_flags": list(cpu_bf16_flags()),
              "rows": rows}
    for label, row in rows.items():
        print(f"{label:16s} " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
