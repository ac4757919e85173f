"""Memory each role's model takes: per-role weights (issue 10) against the whole model.

Every row loads in a fresh subprocess (so nothing an earlier load left in the allocator
counts), then reads every parameter once, as the first forward would: a float32 checkpoint
loaded as float32 stays a private memory map of the safetensors file (as with
``from_pretrained``), whose pages become resident only when read. After ``gc.collect()`` it
reports:

- **param MB**: bytes of the loaded parameters (tied ones once);
- **+RSS MB**: growth of ``VmRSS`` over the same process just before the load (torch,
  transformers and the image processor's modules already imported): the weights' real cost;
  **RSS MB** the total, ``RssAnon``/``RssFile`` its private and file-mapped shares;
- **peak MB**: ``VmHWM``, the high-water mark (a bfloat16 load holds the float32 pages it
  converts from while it runs);
- **load s**: wall time of the load.

Rows: ``before`` is what every role did until now (``Qwen2VLForConditionalGeneration.from_pretrained``,
all weights); ``E``, ``P``, ``D`` are the single-role services (``role_parts``); ``EP``, ``PD``,
``EPD`` the co-located processes (``services.host``: the union, loaded once). Deterministic: no
random input, nothing timed but the load.

    .venv/bin/python benchmarks/role_memory.py --model ~/.cache/epd-serve/models/mid-seed0 \
        --out docs/bench/role-memory-mid.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROWS = {  # name: roles whose parts are loaded ("" = transformers from_pretrained, all weights)
    "before": "",
    "E": "encoder",
    "P": "prefill",
    "D": "decode",
    "EP": "encoder,prefill",
    "PD": "prefill,decode",
    "EPD": "encoder,prefill,decode",
}


def _status() -> dict[str, float]:
    """``VmRSS``, ``RssAnon``, ``RssFile``, ``VmHWM`` of this process in MB (Linux ``/proc``)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def child(model: str, dtype_name: str, roles: str) -> dict:
    """One load in this process; returns the row's measurements."""
    import gc

    import torch
    from transformers import AutoConfig, AutoImageProcessor, Qwen2VLForConditionalGeneration

    sys.path.insert(0, str(ROOT))
    from epd.models.qwen2_vl import Qwen2VLAdapter, role_parts

    dtype = getattr(torch, dtype_name)
    AutoConfig.from_pretrained(model), AutoImageProcessor.from_pretrained(model)  # imports out of the baseline
    gc.collect()
    before = _status()
    t0 = time.perf_counter()
    if roles:
        parts = role_parts(*roles.split(","))
        loaded = Qwen2VLAdapter.load(model, dtype=dtype, parts=parts).model
    else:
        parts = frozenset({"vision", "language"})
        loaded = Qwen2VLForConditionalGeneration.from_pretrained(model, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    gc.collect()
    lazy = _status()
    with torch.no_grad():
        for p in loaded.parameters():
            p.sum()
    after = _status()
    params = {p.data_ptr(): p.numel() * p.element_size() for p in loaded.parameters()}
    return {
        "roles": roles or "all (from_pretrained)",
        "parts": sorted(parts),
        "param_count": sum(p.numel() for p in {p.data_ptr(): p for p in loaded.parameters()}.values()),
        "param_mb": sum(params.values()) / 2**20,
        "rss_mb": after["VmRSS"],
        "load_rss_mb": after["VmRSS"] - before["VmRSS"],
        "rss_anon_mb": after["RssAnon"],
        "rss_file_mb": after["RssFile"],
        "peak_mb": after["VmHWM"],
        "baseline_rss_mb": before["VmRSS"],
        "rss_before_reading_mb": lazy["VmRSS"],
        "load_s": load_s,
    }


def run_row(model: Path, dtype: str, roles: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--dtypes", dtype, "--roles", roles]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"subset of {', '.join(ROWS)}")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--roles", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(str(args.model), args.dtypes, args.roles)))
        return

    rows = []
    for dtype in args.dtypes.split(","):
        full = None
        for name in args.rows.split(","):
            row = {"row": name, "dtype": dtype, **run_row(args.model, dtype, ROWS[name])}
            full = row if name == "before" else full
            rows.append(row)
        for row in rows:
            if row["dtype"] == dtype and full is not None:
                row["x_less_rss_than_before"] = full["load_rss_mb"] / row["load_rss_mb"]
    print(f"{'row':<7} {'dtype':<9} {'parts':<17} {'params M':>9} {'param MB':>9} {'+RSS MB':>8} {'RSS MB':>8} "
          f"{'anon MB':>8} {'file MB':>8} {'peak MB':>8} {'load s':>7} {'÷ before':>8}")  # fmt: skip
    for r in rows:
        ratio = f"{r['x_less_rss_than_before']:>7.2f}×" if "x_less_rss_than_before" in r else f"{'–':>8}"
        print(f"{r['row']:<7} {r['dtype']:<9} {'+'.join(r['parts']):<17} {r['param_count'] / 1e6:>9.1f} "
              f"{r['param_mb']:>9.1f} {r['load_rss_mb']:>8.0f} {r['rss_mb']:>8.0f} {r['rss_anon_mb']:>8.0f} "
              f"{r['rss_file_mb']:>8.0f} {r['peak_mb']:>8.0f} {r['load_s']:>7.2f} {ratio}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
