"""Each stage against this machine's physical limit, measured in one run (issue 13's yardstick).

1. **Machine**: GEMM peak (GFLOP/s) of a 1024×4096×4096 matmul in float32 and bfloat16, and
   memory bandwidth (GB/s) of a 1 GiB read (``sum``) and copy — best of ``--reps``, on
   ``torch.get_num_threads()`` threads.
2. **Encoder**: the vision tower + merger on one ``--image`` px square photo. FLOPs counted by
   ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, SDPA); utilisation =
   FLOPs ÷ time ÷ GEMM peak of the dtype.
3. **Prefill**: the packed prefill (:meth:`Qwen2VLRunner.prefill`) of one ``--prefill-len``-token
   prompt; the same utilisation.
4. **Decode**: one step (:meth:`Qwen2VLRunner.decode`) at batch 1 and 32 with ``--context``
   tokens of KV each. Bandwidth bound = (bytes of the language model's weights read per step —
   every decoder layer and the LM head — plus the batch's KV bytes) ÷ read bandwidth; the
   step's ratio to it (≤ 1.3 is the target), and its FLOP utilisation.

    .venv/bin/python benchmarks/limits.py --model ~/.cache/epd-serve/models/mid-seed0 \
        --out benchmarks/results/limits.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epd.engine.kv_pool import KvLayout, KvPool  # noqa: E402
from epd.models.qwen2_runner import Qwen2VLRunner  # noqa: E402
from epd.models.qwen2_vl import Qwen2VLAdapter  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def best(fn, reps: int) -> float:
    """Fastest of ``reps`` timed calls (s), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def flops(fn) -> int:
    """FLOPs of one call of ``fn`` as torch's flop counter sees them."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def gemm_peak(dtype: torch.dtype, reps: int) -> float:
    """GFLOP/s of a 1024×4096 @ 4096×4096 matmul."""
    a = torch.randn(1024, 4096, dtype=dtype)
    b = torch.randn(4096, 4096, dtype=dtype)
    return 2 * 1024 * 4096 * 4096 / best(lambda: torch.mm(a, b), reps) / 1e9


def bandwidth(reps: int) -> tuple[float, float]:
    """(read GB/s of ``sum`` over 1 GiB, copy GB/s counting read + write) ."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    y = torch.empty_like(x)
    n = x.numel() * 4
    read = n / best(lambda: x.sum(), reps) / 1e9
    copy = 2 * n / best(lambda: y.copy_(x), reps) / 1e9
    return read, copy


def photo(size: int):
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((size, size))


def stage_rows(model: Path, dtype_name: str, peak: float, read_bw: float, args) -> list[dict]:
    """Encoder, prefill and decode figures of one dtype."""
    dtype = DTYPES[dtype_name]
    adapter = Qwen2VLAdapter.load(model, dtype=dtype)
    runner = Qwen2VLRunner(adapter)
    rows = []
    with torch.inference_mode():
        img = photo(args.image)
        enc = lambda: adapter.encode([img])  # noqa: E731
        t, f = best(enc, args.reps), flops(enc)
        rows.append({"stage": "encoder", "dtype": dtype_name, "shape": f"1 image {args.image}²", "ms": t * 1e3,
                     "gflop": f / 1e9, "gflops": f / t / 1e9, "flop_util": f / t / 1e9 / peak})

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, adapter.vocab_size - 20, (args.prefill_len,), generator=g).tolist()
        embeds, pos, _ = adapter.prompt_inputs(ids, [], [])
        pre = lambda: runner.prefill(embeds, pos, [len(ids)])  # noqa: E731
        t, f = best(pre, args.reps), flops(pre)
        rows.append({"stage": "prefill", "dtype": dtype_name, "shape": f"{args.prefill_len} tokens", "ms": t * 1e3,
                     "gflop": f / 1e9, "gflops": f / t / 1e9, "flop_util": f / t / 1e9 / peak})

        elem = torch.tensor([], dtype=dtype).element_size()
        lm_bytes = sum(p.numel() for layer in runner.layers for p in layer.parameters()) * elem
        lm_bytes += sum(p.numel() for p in runner.lm_head.parameters()) * elem
        for batch in (1, 32):
            block = 16
            per_req = -(-(args.context + 1) // block)
            layout = KvLayout(adapter.num_layers, batch * per_req + 1, block, adapter.num_kv_heads, adapter.head_dim,
                              dtype_name)
            kv = KvPool(layout).kv
            kv.normal_()
            tables = torch.arange(batch * per_req).view(batch, per_req)
            tokens = torch.randint(10, adapter.vocab_size - 20, (batch,), generator=g)
            slots = torch.full((batch,), args.context, dtype=torch.int64)
            step = lambda: runner.decode(tokens, slots.clone(), kv, tables, slots)  # noqa: E731,B023
            t, f = best(step, args.reps), flops(step)
            kv_bytes = (2 * adapter.num_layers * batch * (args.context + 1) * adapter.num_kv_heads
                        * adapter.head_dim * elem)
            bound = (lm_bytes + kv_bytes) / (read_bw * 1e9)
            rows.append({"stage": "decode", "dtype": dtype_name, "shape": f"batch {batch}, {args.context} ctx",
                         "ms": t * 1e3, "gflop": f / 1e9, "gflops": f / t / 1e9, "flop_util": f / t / 1e9 / peak,
                         "bytes_per_step": lm_bytes + kv_bytes, "bw_bound_ms": bound * 1e3, "x_bw_bound": t / bound})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--image", type=int, default=448, help="square photo side (px)")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--context", type=int, default=512, help="KV tokens per request at the decode step")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    peaks = {name: gemm_peak(dt, args.reps) for name, dt in DTYPES.items()}
    read_bw, copy_bw = bandwidth(args.reps)
    print(f"threads {threads}: GEMM peak fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s; "
          f"memory read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s")
    rows = []
    for name in args.dtypes.split(","):
        rows += stage_rows(args.model, name, peaks[name], read_bw, args)
    print(f"{'stage':<8} {'dtype':<9} {'shape':<20} {'ms':>9} {'GFLOP':>8} {'GFLOP/s':>8} {'÷ peak':>7} "
          f"{'bw bound ms':>11} {'÷ bound':>8}")
    for r in rows:
        bw = f"{r['bw_bound_ms']:>11.2f} {r['x_bw_bound']:>7.2f}×" if "bw_bound_ms" in r else f"{'–':>11} {'–':>8}"
        print(f"{r['stage']:<8} {r['dtype']:<9} {r['shape']:<20} {r['ms']:>9.1f} {r['gflop']:>8.2f} "
              f"{r['gflops']:>8.0f} {r['flop_util']:>7.2f} {bw}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": threads, "gemm_peak_gflops": peaks, "read_gb_s": read_bw,
                                        "copy_gb_s": copy_bw, "model": str(args.model), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
