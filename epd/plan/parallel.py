"""How much of its cores this host really gives to several single-threaded compute processes at once.

The simulator shares a cpu host among its busy processes as processor sharing over ``cores``.
On a VM the vCPUs may be SMT siblings of one physical core, and processes on different cores
still contend for caches and memory bandwidth, so ``cores`` busy one-thread processes often get
less than ``cores`` times the work of one. :func:`measure` runs the engine's own work (an encode
of a 224² photo and a 128-token prefill, in a loop) in one process alone, then in ``cores``
processes at once, and so on up to a few more processes than cores, and returns the work done
per second in each case (the *capacity curve*, in solo units) and ``e`` = capacity(cores) ÷
cores (the *parallel efficiency*); the simulator shares the capacity at each instant's number
of busy threads. :func:`colocation_efficiency` is the same for two roles' loops in
threads of one process (an ``EP`` process): how much of its threads they get together.
:func:`measure` also measures what one stage suffers from another running beside it in a second
process (shared caches and memory bandwidth) with the duty-cycled pair probe of
:mod:`epd.plan.slowdown`; the simulator applies it per pair of running stages
(:class:`epd.plan.shared.SharedDevice`).

Run as ``python -m epd.plan.parallel MODEL DTYPE SOCKET N``, it loads the model, forks into N
workers, each connected to the Unix socket SOCKET, and each works one round per ``run SECONDS AT
[UNIT]`` line it reads (UNIT: ``mix`` — encode then prefill, the default — or one of
:data:`STAGES`), answering its rate; ``windows UNIT [[START, END], …]`` works UNIT inside each
wall-clock window and answers ``units [[start, end], …]``, every unit it ran;
``colocated SECONDS`` measures two of its threads (:func:`_colocated_rates`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from epd.plan.slowdown import STAGES, pairs, period_s, schedule, slowdown_table

__all__ = ["STAGES", "measure", "colocation_efficiency"]


def _units(model: str, dtype: str):
    """``(encode, prefill, decode, encode_large)``: one-thread callables on the loaded model — an
    encode of a 224² photo, a 128-token prefill, a decode step of 4 requests at 256 tokens of
    context over a paged KV pool and an encode of an 802×652 photo, the probes' units of work."""
    import torch

    torch.set_num_threads(1)
    from epd.device import torch_dtype
    from epd.models.qwen2_runner import Qwen2VLRunner
    from epd.models.qwen2_vl import Qwen2VLAdapter
    from epd.plan.probes import sample_images

    adapter = Qwen2VLAdapter.load(model, dtype=torch_dtype(dtype))
    runner = Qwen2VLRunner(adapter)
    photos = sample_images(0)
    image, large = photos[(224, 224)][0], photos[(802, 652)][0]
    ids = torch.randint(10, adapter.vocab_size - 20, (128,), generator=torch.Generator().manual_seed(0)).tolist()

    def encode():
        adapter.encode([image])

    def encode_large():
        adapter.encode([large])

    def prefill():
        e, p, _ = adapter.prompt_inputs(ids, [], [])
        runner.prefill(e, p, [len(ids)])

    from epd.engine.kv_pool import KvLayout, KvPool

    batch, ctx, block = 4, 256, 16
    per_req = ctx // block + 1
    pool = KvPool(KvLayout(adapter.num_layers, batch * per_req, block, adapter.num_kv_heads, adapter.head_dim,
                           dtype))
    pool.kv.normal_(generator=torch.Generator().manual_seed(0))
    tables = torch.arange(batch * per_req).view(batch, per_req)
    last = torch.tensor(ids[:batch])
    pos = torch.full((batch,), ctx)

    def decode():
        runner.decode(last, pos, pool.kv, tables, pos)

    return encode, prefill, decode, encode_large


def _worker(model: str, dtype: str, address: str, workers: int) -> None:
    """Load the model once, fork into ``workers`` processes (the children share the loaded weights
    copy-on-write: one load instead of ``workers``, ~15 s less on 2 cores), and have each connect
    to the Unix socket ``address``, warm up, send ``ready``, then serve lines: for each ``run
    SECONDS AT [UNIT]`` work from the ``time.time()`` instant AT for SECONDS and answer ``rate R``;
    for a ``colocated SECONDS`` answer :func:`_colocated_rates`' JSON; stop at end of input.

    The fork happens before any forward has run, and with one intra-op thread (``OMP_NUM_THREADS=1``)
    no OpenMP pool exists yet to be inherited."""
    import socket

    encode, prefill, decode, encode_large = _units(model, dtype)
    children = []
    for _ in range(workers - 1):
        pid = os.fork()
        if pid == 0:
            children = None
            break
        children.append(pid)

    def mix():
        encode()
        prefill()

    # the pair rounds' encode is an 802×652 photo: a serving-sized image, whose activations press on
    # the shared cache as a 224² one's do not
    units = {"mix": mix, "encode": encode_large, "prefill": prefill, "decode": decode}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    rfile, wfile = sock.makefile("r"), sock.makefile("w")

    def say(text: str) -> None:
        wfile.write(text + "\n")
        wfile.flush()

    mix()
    decode()
    say("ready")
    for line in rfile:
        if line.startswith("windows "):
            _, name, spans = line.split(" ", 2)
            say("units " + json.dumps(_windows(units[name], json.loads(spans)), separators=(",", ":")))
            continue
        cmd, seconds, *rest = line.split()
        if cmd == "colocated":
            say(json.dumps(_colocated_rates(encode, prefill, float(seconds))))
            continue
        at, *name = rest
        unit = units[name[0] if name else "mix"]
        time.sleep(max(0.0, float(at) - time.time()))
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < float(seconds):
            unit()
            n += 1
        say(f"rate {n / (time.perf_counter() - t0)}")
    if children is None:
        os._exit(0)  # a forked child: no interpreter teardown of the parent's state
    for pid in children:
        os.waitpid(pid, 0)


def _windows(unit, spans: list[list[float]]) -> list[list[float]]:
    """Work ``unit`` inside each wall-clock window ``[start, end]`` (starting units until ``end``);
    ``[[start, end], …]`` (``time.time()`` seconds) of every unit run."""
    done = []
    for start, end in spans:
        time.sleep(max(0.0, start - time.time()))
        while (t := time.time()) < end:
            unit()
            done.append([t, time.time()])
    return done


def _colocated_rates(enc, pre, seconds: float) -> dict:
    """``{"solo": {"encode", "prefill"}, "together": {same}}`` (units/s): the encode and prefill
    units alone, then in two threads of this one process at once (as the encoder and prefill
    loops of an ``EP`` process run); ``{"error": text}`` when a unit raised."""
    import threading

    errors: list[str] = []

    def loop(fn, until, out, key):
        n, t0 = 0, time.perf_counter()
        try:
            while time.perf_counter() < until:
                fn()
                n += 1
        except Exception as exc:  # reported to the caller, not lost with the thread
            errors.append(f"{key}: {type(exc).__name__}: {exc}")
            return
        out[key] = n / max(1e-9, time.perf_counter() - t0)

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
    if errors:
        return {"error": "; ".join(errors)}
    return {"solo": solo, "together": both}


def colocation_efficiency(rates: dict) -> dict:
    """``{"process_colocation_efficiency": s, "colocated_rates": rates}`` from
    :func:`_colocated_rates`' result: s = Σ (rate together ÷ rate alone) of an encode loop and a
    prefill loop in two threads of one 1-thread process. Fair sharing of the process's one thread
    gives 1; the interpreter lock's hand-offs between short ops give less; ops that release it
    long enough to overlap on another core give more."""
    s = sum(rates["together"][k] / rates["solo"][k] for k in ("encode", "prefill"))
    return {"process_colocation_efficiency": s, "colocated_rates": rates}


def _rounds(model: Path, dtype: str, seconds: float, counts: list[int], pair_seconds: float = 0.0,
            colocated_seconds: float = 0.0) -> tuple[dict[int, list[float]], dict, dict | None]:
    """``({k: rates (units/s) of k workers working the mixed unit at once} for each k in ``counts``,
    {(a, b): (a's units, b's units)} of each pair phase, :func:`_colocated_rates`' result or None)``:
    max(counts) (at least 2 with ``pair_seconds``) workers load the model once; each round starts
    its workers at the same instant. With ``pair_seconds``, each pair of stages of
    :func:`epd.plan.slowdown.pairs` then runs on workers 0 and 1 for about that long on the duty
    cycle of :func:`epd.plan.slowdown.schedule` (at least 3 cycles; its state length from each
    stage's unit time, taken in a short solo round first), every unit timed. With
    ``colocated_seconds`` worker 0 then measures two of its threads (all other workers idle)."""
    import socket
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    n = max([*counts, 2 if pair_seconds > 0 else 1])
    tmp = tempfile.TemporaryDirectory(prefix="epd-parallel-")
    address = os.path.join(tmp.name, "workers.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(n)
    server.settimeout(1.0)
    log_path = os.path.join(tmp.name, "workers.log")
    with open(log_path, "wb") as log:  # the workers' stderr (a pipe nobody reads could fill and block them)
        leader = subprocess.Popen([sys.executable, "-m", "epd.plan.parallel", str(model), dtype, address, str(n)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env,
                                  start_new_session=True)

    def log_tail() -> str:
        with open(log_path, errors="replace") as f:
            lines = f.read().strip().splitlines()
        return lines[-1] if lines else "no message"

    conns: list = []
    procs: list = []

    def tell(p, line: str) -> None:
        """Send a worker one line; a worker that died raises with the workers' last error."""
        try:
            p.stdin.write(line + "\n")
            p.stdin.flush()
        except OSError:
            raise RuntimeError(f"parallel probe worker exited mid-measurement: {log_tail()}") from None

    def answer(p) -> str:
        """A worker's next line; its end (a worker that died) raises with the workers' last error."""
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"parallel probe worker exited mid-measurement: {log_tail()}")
        return line

    def round_(units: tuple[str, ...], secs: float = seconds) -> list[float]:
        """Each worker i works units[i] ("": rests, rate 0)."""
        at = time.time() + 0.2
        busy = [(p, unit) for p, unit in zip(procs, units, strict=False) if unit]
        for p, unit in busy:
            tell(p, f"run {secs} {at} {unit}")
        rates = {id(p): float(answer(p).split()[-1]) for p, _ in busy}
        return [rates.get(id(p), 0.0) for p in procs[:len(units)]]

    try:
        deadline = time.monotonic() + 300.0
        while len(conns) < n:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                if leader.poll() is None and time.monotonic() < deadline:
                    continue
                leader.kill()
                raise RuntimeError(f"parallel probe workers failed to start (exit {leader.wait()}): "
                                   f"{log_tail()}") from None
            conns.append(conn)
            procs.append(_Peer(conn.makefile("r"), conn.makefile("w")))
        for p in procs:
            if not p.stdout.readline().startswith("ready"):
                raise RuntimeError(f"parallel probe worker failed to warm up: {log_tail()}")
        out = {k: round_(("mix",) * k) for k in counts}
        phases: dict = {}
        if pair_seconds > 0:
            unit_s = {st: 1.0 / max(1e-9, round_((st, ""), 0.5)[0]) for st in STAGES}
            for a, b in pairs():
                state = period_s(unit_s, a, b)
                first, second = schedule(time.time() + 0.2, state, max(3, math.ceil(pair_seconds / (3 * state))))
                for p, unit, spans in ((procs[0], a, first), (procs[1], b, second)):
                    tell(p, f"windows {unit} {json.dumps(spans)}")
                phases[(a, b)] = tuple(json.loads(answer(p).split(" ", 1)[1]) for p in procs[:2])
        colo = None
        for _ in range(2 if colocated_seconds > 0 else 0):  # once more if a unit raised
            tell(procs[0], f"colocated {colocated_seconds}")
            colo = json.loads(answer(procs[0]))
            if "error" not in colo:
                break
        if colo is not None and "error" in colo:
            raise RuntimeError(f"co-location probe failed twice: {colo['error']}")
        return out, phases, colo
    finally:
        for c in conns:  # shutdown, not just close: the makefile()s keep the descriptor open
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        server.close()
        try:
            leader.wait(10.0)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(leader.pid, 9)  # the forked workers too, should any be left
        except ProcessLookupError:
            pass
        leader.wait()
        tmp.cleanup()


class _Peer:
    """One forked worker's connection: ``stdin`` to write lines to it, ``stdout`` to read its answers."""

    def __init__(self, rfile, wfile) -> None:
        self.stdout, self.stdin = rfile, wfile


def measure(model: Path, dtype: str, cores: int, seconds: float = 4.0, extra: int = 3,
            pair_seconds: float = 4.0, colocated_seconds: float = 0.0) -> dict:
    """How much work this host does with ``k`` busy one-thread processes, for k = 1 … ``cores`` +
    ``extra`` (a deployment runs more processes than cores: E-P-D on 2 cores is three services
    plus the gateway and the client); with ≥ 2 cores also what each stage loses beside another
    (:mod:`epd.plan.slowdown`: each pair of stages — an encode of an 802×652 photo, a 128-token
    prefill, a decode step of 4 × 256 tokens — duty-cycled in two processes for about
    ``pair_seconds``, placed by the OS as it places the services. On one core the two would
    time-share, which the capacity curve already models); with ``colocated_seconds``,
    :func:`colocation_efficiency`'s keys too.

    Returns:
        ``{"parallel_capacity": {k: Σ rates of k concurrent workers ÷ the rate of one alone},
        "parallel_efficiency": capacity(cores) ÷ cores, "solo_rate", "parallel_rates": {k: rates}}``.
        Capacity is in cores' worth of solo work. Measured on one 2-vCPU VM: 1.82 at k=2 but only
        1.38 at k=3 — three runnable processes on two cores lose a third of the second core to
        time-slicing and migration, which no per-core figure shows (another VM: 2.0 at k=2…4).
        With ≥ 2 cores, also :func:`epd.plan.slowdown.slowdown_table`'s keys.
    """
    rates, phases, colo = _rounds(model, dtype, seconds, list(range(1, cores + extra + 1)) if cores > 1 else [1],
                                  pair_seconds if cores > 1 else 0.0, colocated_seconds=colocated_seconds)
    solo = rates[1][0]
    capacity = {str(k): min(float(k), float(cores), sum(r) / solo) for k, r in rates.items()}
    eff = capacity.get(str(cores), 1.0) / cores if cores > 1 else 1.0
    return {"parallel_capacity": capacity, "parallel_efficiency": min(1.0, eff), "solo_rate": solo,
            "parallel_rates": {str(k): r for k, r in rates.items()}, **(slowdown_table(phases) if phases else {}),
            **(colocation_efficiency(colo) if colo else {})}


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
