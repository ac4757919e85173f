"""One-sided write bandwidth of the transfer backends between two processes on this host.

For each backend (``shm``; ``mooncake`` with ``--protocols``, default ``tcp``) a peer process
allocates the destination region and publishes its handle; this process allocates the source,
fills it with seeded random bytes, and times ``write`` of ``--sizes`` MiB: as one segment, and
as ``--segment-kib`` segments (one per layer, K/V and block run in a KV transfer). Best and
median GB/s of ``--reps`` repetitions after one warm-up; the peer checksums the bytes of the
last write. Regions are on the process device (host memory here). Prints one table and writes
JSON (``--out``).

    .venv/bin/python benchmarks/transfer.py --out /tmp/transfer.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epd.transfer import create_backend  # noqa: E402


def _peer(kind: str, protocol: str, nbytes: int) -> None:
    """Peer side: allocate, print the handle, answer 'sum' with a checksum of the region, exit on EOF."""
    with create_backend(kind, timeout_s=60, protocol=protocol) as backend:
        region = backend.allocate(nbytes, "dst")
        print(region.handle, flush=True)
        for line in sys.stdin:
            if line.strip() == "sum":
                print(int(region.tensor.to(torch.int64).sum()), flush=True)


def _segments(nbytes: int, run_bytes: int) -> tuple[list[int], list[int], list[int]]:
    """Consecutive segments of ``run_bytes`` (not merged) at the same offsets on both sides,
    covering ``nbytes``."""
    offs = list(range(0, nbytes, run_bytes))
    return offs, offs, [min(run_bytes, nbytes - o) for o in offs]


def measure(kind: str, protocol: str, nbytes: int, run_bytes: int, reps: int, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--peer", kind, protocol, str(nbytes)]
    peer = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        handle = peer.stdout.readline().strip()
        with create_backend(kind, timeout_s=60, protocol=protocol) as backend:
            src = backend.allocate(nbytes, "src")
            gen = torch.Generator().manual_seed(seed)
            src.tensor.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen))
            local, remote, lengths = ([0], [0], [nbytes]) if run_bytes >= nbytes else _segments(nbytes, run_bytes)
            backend.write(src, handle, local, remote, lengths)  # warm-up: connection, first-touch page faults
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                backend.write(src, handle, local, remote, lengths)
                times.append(time.perf_counter() - t0)
            peer.stdin.write("sum\n")
            peer.stdin.flush()
            ok = int(peer.stdout.readline()) == int(src.tensor.to(torch.int64).sum())
    finally:
        peer.stdin.close()
        peer.wait(timeout=60)
    gbps = [nbytes / t / 1e9 for t in times]
    return {"backend": kind if kind == "shm" else f"{kind}-{protocol}", "mib": nbytes >> 20,
            "segments": len(lengths), "best_gbps": max(gbps), "median_gbps": statistics.median(gbps),
            "median_ms": statistics.median(times) * 1e3, "verified": ok}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        _peer(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,16,64", help="MiB, comma-separated")
    ap.add_argument("--protocols", default="tcp", help="mooncake protocols to measure, comma-separated")
    ap.add_argument("--segment-kib", type=int, default=256, help="bytes per segment of the segmented case (KiB)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="transfer.json")
    args = ap.parse_args()
    backends = [("shm", "tcp")] + [("mooncake", p) for p in args.protocols.split(",") if p]
    rows = []
    for kind, protocol in backends:
        for mib in (int(s) for s in args.sizes.split(",")):
            for run in (mib << 20, args.segment_kib << 10):
                rows.append(measure(kind, protocol, mib << 20, run, args.reps, args.seed))
    print(f"\n{'backend':<14}{'MiB':>6}{'segments':>10}{'best GB/s':>11}{'median GB/s':>13}{'median ms':>11}  ok")
    for r in rows:
        print(f"{r['backend']:<14}{r['mib']:>6}{r['segments']:>10}{r['best_gbps']:>11.2f}{r['median_gbps']:>13.2f}"
              f"{r['median_ms']:>11.2f}  {r['verified']}")
    meta = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__, "reps": args.reps,
            "seed": args.seed, "segment_kib": args.segment_kib}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
