"""How much of its cores this host really gives to several single-threaded compute processes at once.

The simulator shares a cpu host among its busy processes as processor sharing over ``cores``.
On a VM the vCPUs may be SMT siblings of one physical core, and processes on different cores
still contend for caches and memory bandwidth, so ``cores`` busy one-thread processes often get
less than ``cores`` times the work of one. :func:`measure` runs the engine's own work (an encode
of a 224² photo and a 128-token prefill, in a loop) in one process alone, then in ``cores``
processes at once, and returns the ratio: the *parallel efficiency* ``e``; the simulator then
shares ``cores · e`` effective cores. :func:`colocated` measures the same for two roles' loops in
threads of one process (an ``EP`` process): how much of its threads they get together.

Run as ``python -m epd.plan.parallel MODEL DTYPE SECONDS GO_FILE``, a worker loads the model,
waits for GO_FILE, works for SECONDS and prints its rate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _worker(model: str, dtype: str, seconds: float, go: str) -> None:
    import torch

    torch.set_num_threads(1)
    from epd.device import torch_dtype
    from epd.models.qwen2_runner import Qwen2VLRunner
    from epd.models.qwen2_vl import Qwen2VLAdapter
    from epd.plan.profiler import sample_images

    adapter = Qwen2VLAdapter.load(model, dtype=torch_dtype(dtype))
    runner = Qwen2VLRunner(adapter)
    image = sample_images(0)[(224, 224)][0]
    ids = torch.randint(10, adapter.vocab_size - 20, (128,), generator=torch.Generator().manual_seed(0)).tolist()

    def unit():
        adapter.encode([image])
        e, p, _ = adapter.prompt_inputs(ids, [], [])
        runner.prefill(e, p, [len(ids)])

    unit()
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        unit()
        n += 1
    print(f"rate {n / (time.perf_counter() - t0)}", flush=True)


def _colocated_worker(model: str, dtype: str, seconds: float) -> None:
    """Encode and prefill units alone, then in two threads of this one process at once (as the
    encoder and prefill loops of an ``EP`` process run); prints the rates as JSON."""
    import json
    import threading

    import torch

    torch.set_num_threads(1)
    from epd.device import torch_dtype
    from epd.models.qwen2_runner import Qwen2VLRunner
    from epd.models.qwen2_vl import Qwen2VLAdapter
    from epd.plan.profiler import sample_images

    adapter = Qwen2VLAdapter.load(model, dtype=torch_dtype(dtype))
    runner = Qwen2VLRunner(adapter)
    image = sample_images(0)[(224, 224)][0]
    ids = torch.randint(10, adapter.vocab_size - 20, (128,), generator=torch.Generator().manual_seed(0)).tolist()

    def enc():
        adapter.encode([image])

    def pre():
        e, p, _ = adapter.prompt_inputs(ids, [], [])
        runner.prefill(e, p, [len(ids)])

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


def _run(model: Path, dtype: str, seconds: float, k: int) -> list[float]:
    """Rates (units/s) of ``k`` workers started together."""
    with tempfile.TemporaryDirectory() as tmp:
        go = os.path.join(tmp, "go")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-m", "epd.plan.parallel", str(model), dtype, str(seconds), go],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
                 for _ in range(k)]
        try:
            for p in procs:
                line = p.stdout.readline()
                if not line.startswith("ready"):
                    raise RuntimeError(f"parallel probe worker failed to start (exit {p.wait()})")
            Path(go).touch()
            rates = []
            for p in procs:
                out, _ = p.communicate(timeout=seconds * 10 + 60)
                rates.append(float(out.split()[-1]))
            return rates
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()


def measure(model: Path, dtype: str, cores: int, seconds: float = 4.0) -> dict:
    """``{"parallel_efficiency": e, "solo_rate", "parallel_rates"}``: ``e`` = Σ rates of ``cores``
    concurrent one-thread workers ÷ (``cores`` × the rate of one alone), at most 1."""
    solo = _run(model, dtype, seconds, 1)[0]
    if cores <= 1:
        return {"parallel_efficiency": 1.0, "solo_rate": solo, "parallel_rates": [solo]}
    together = _run(model, dtype, seconds, cores)
    return {"parallel_efficiency": min(1.0, sum(together) / (cores * solo)), "solo_rate": solo,
            "parallel_rates": together}


if __name__ == "__main__":
    if sys.argv[1] == "--colocated":
        _colocated_worker(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        _worker(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
