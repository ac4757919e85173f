"""How much of its cores this host really gives to several single-threaded compute processes at once.

The simulator shares a cpu host among its busy processes as processor sharing over ``cores``.
On a VM the vCPUs may be SMT siblings of one physical core, and processes on different cores
still contend for caches and memory bandwidth, so ``cores`` busy one-thread processes often get
less than ``cores`` times the work of one. :func:`measure` runs the engine's own work (an encode
of a 224² photo and a 128-token prefill, in a loop) in one process alone, then in ``cores``
processes at once, and so on up to a few more processes than cores, and returns the work done
per second in each case (the *capacity curve*, in solo units) and ``e`` = capacity(cores) ÷
cores (the *parallel efficiency*); the simulator shares the capacity at each instant's number
of busy threads. :func:`colocated` measures the same for two roles' loops in
threads of one process (an ``EP`` process): how much of its threads they get together.

Run as ``python -m epd.plan.parallel MODEL DTYPE``, a worker loads the model and works one
round per ``run SECONDS AT`` line on its stdin, printing its rate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def _units(model: str, dtype: str):
    """``(encode, prefill)``: one-thread callables on the loaded model — an encode of a 224² photo
    and a 128-token prefill, the probes' units of work."""
    import torch

    torch.set_num_threads(1)
    from epd.device import torch_dtype
    from epd.models.qwen2_runner import Qwen2VLRunner
    from epd.models.qwen2_vl import Qwen2VLAdapter
    from epd.plan.probes import sample_images

    adapter = Qwen2VLAdapter.load(model, dtype=torch_dtype(dtype))
    runner = Qwen2VLRunner(adapter)
    image = sample_images(0)[(224, 224)][0]
    ids = torch.randint(10, adapter.vocab_size - 20, (128,), generator=torch.Generator().manual_seed(0)).tolist()

    def encode():
        adapter.encode([image])

    def prefill():
        e, p, _ = adapter.prompt_inputs(ids, [], [])
        runner.prefill(e, p, [len(ids)])

    return encode, prefill


def _worker(model: str, dtype: str) -> None:
    """Load the model, print ``ready``, then for each ``run SECONDS AT`` line on stdin work from the
    ``time.time()`` instant AT for SECONDS and print ``rate R``; stop at end of input."""
    encode, prefill = _units(model, dtype)

    def unit():
        encode()
        prefill()

    unit()
    print("ready", flush=True)
    for line in sys.stdin:
        _, seconds, at = line.split()
        time.sleep(max(0.0, float(at) - time.time()))
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < float(seconds):
            unit()
            n += 1
        print(f"rate {n / (time.perf_counter() - t0)}", flush=True)


def _colocated_worker(model: str, dtype: str, seconds: float) -> None:
    """Encode and prefill units alone, then in two threads of this one process at once (as the
    encoder and prefill loops of an ``EP`` process run); prints the rates as JSON."""
    import json
    import threading

    enc, pre = _units(model, dtype)

    def loop(fn, until, out, key):
        n = 0
        while time.perf_counter() < until:
            fn()
            n += 1
        out[key] = n / seconds

    enc(), pre()
    solo: dict[str, float] = {}
    loop(enc, time.perf_counter() + seconds, solo, "encode")
    loop(pre, time.perf_counter() + seconds, solo, "prefill")
    both: dict[str, float] = {}
    until = time.perf_counter() + seconds
    threads = [threading.Thread(target=loop, args=(fn, until, both, k))
               for fn, k in ((enc, "encode"), (pre, "prefill"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"solo": solo, "together": both}), flush=True)


def colocated(model: Path, dtype: str, seconds: float = 4.0) -> dict:
    """``{"process_colocation_efficiency": s, ...}``: s = Σ (rate together ÷ rate alone) of an
    encode loop and a prefill loop in two threads of one 1-thread process. Fair sharing of the
    process's one thread gives 1; the interpreter lock's hand-offs between short ops give less;
    ops that release it long enough to overlap on another core give more."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "epd.plan.parallel", "--colocated", str(model), dtype, str(seconds)],
                         capture_output=True, text=True, env=env, timeout=seconds * 20 + 120, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    s = sum(res["together"][k] / res["solo"][k] for k in ("encode", "prefill"))
    return {"process_colocation_efficiency": s, "colocated_rates": res}


def _rounds(model: Path, dtype: str, seconds: float, counts: list[int]) -> dict[int, list[float]]:
    """``{k: rates (units/s) of k workers working at once}`` for each k in ``counts``: max(counts)
    workers load the model once; each round starts k of them at the same instant."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "epd.plan.parallel", str(model), dtype],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=env)
             for _ in range(max(counts))]
    try:
        for p in procs:
            if not p.stdout.readline().startswith("ready"):
                raise RuntimeError(f"parallel probe worker failed to start (exit {p.wait()})")
        out: dict[int, list[float]] = {}
        for k in counts:
            at = time.time() + 0.2
            for p in procs[:k]:
                p.stdin.write(f"run {seconds} {at}\n")
                p.stdin.flush()
            out[k] = [float(p.stdout.readline().split()[-1]) for p in procs[:k]]
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def measure(model: Path, dtype: str, cores: int, seconds: float = 4.0, extra: int = 3) -> dict:
    """How much work this host does with ``k`` busy one-thread processes, for k = 1 … ``cores`` +
    ``extra`` (a deployment runs more processes than cores: E-P-D on 2 cores is three services
    plus the gateway and the client).

    Returns:
        ``{"parallel_capacity": {k: Σ rates of k concurrent workers ÷ the rate of one alone},
        "parallel_efficiency": capacity(cores) ÷ cores, "solo_rate", "parallel_rates": {k: rates}}``.
        Capacity is in cores' worth of solo work. Measured here (2 vCPUs): 1.82 at k=2 but only
        1.38 at k=3 — three runnable processes on two cores lose a third of the second core to
        time-slicing and migration, which no per-core figure shows.
    """
    rates = _rounds(model, dtype, seconds, list(range(1, cores + extra + 1)) if cores > 1 else [1])
    solo = rates[1][0]
    capacity = {str(k): min(float(k), float(cores), sum(r) / solo) for k, r in rates.items()}
    eff = capacity.get(str(cores), 1.0) / cores if cores > 1 else 1.0
    return {"parallel_capacity": capacity, "parallel_efficiency": min(1.0, eff), "solo_rate": solo,
            "parallel_rates": {str(k): r for k, r in rates.items()}}


if __name__ == "__main__":
    if sys.argv[1] == "--colocated":
        _colocated_worker(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        _worker(sys.argv[1], sys.argv[2])
