"""What the front end really costs on this host: the gateway process and the benchmark client.

The synthetic probe of :func:`epd.plan.probes.measure_host` times the pieces of the token path
(a ZeroMQ hop, detokenization, a JSON chunk) in isolation; the real path also runs aiohttp's
request and SSE handling, the asyncio loops, message signing and the client's own parsing, and
measured ~6× more per token here (≈ 0.3 ms of gateway and 0.13 ms of client CPU per token on
the tiny preset, against 76 µs). :func:`measure_front_end` therefore starts the profiled model
as a real ``epd up --topology E-P-D`` deployment (a private Redis, the launcher's core split),
drives it with ``epd bench serve``'s own client in this process, and reads CPU time:

- the gateway's from ``/proc/PID/task/*/schedstat`` (nanoseconds on a CPU, all its threads),
  less its idle rate measured before;
- the client's as this thread's CPU time (``time.thread_time``: the client's asyncio loop runs
  here).

Four short workloads separate the costs: text requests of one output token (per request), text
requests of many output tokens one at a time and four at a time (per decode step that delivers
tokens — a wake-up of each loop — and per token), and requests with one distinct 448² JPEG and
one output token (per MB of image). Costs are CPU seconds; the simulator runs the gateway and the
client as two serial servers on the host (:class:`epd.plan.sim.Simulator`).

The same runs give the services' cost beyond their forwards (:func:`service_overheads`): the
many-token workloads' median inter-token latency is one service decode step at batch 1 and at
batch 4, and what it exceeds the profiled step by is the loop's receiving, per-token emission (a
signed ``TokenDelta`` each) and scheduling; the one-token workloads' median TTFT, less what the
simulator predicts for them, is the prefill's per-request and the encoder's per-image overhead.
The engine-only profile does not see these (measured here on the tiny preset: about half a
millisecond to a millisecond per decode step, a fifth to a half of a batch-1 step).

The encoder's own log gives one more figure (:func:`encode_beside_decode`): its forward times
(:data:`services.encoder.engine.ENCODED_MSG`) while ``image_one`` runs alone and while the same
images run beside a decode stream (``beside``) — what a served encode loses to a served decode
and its front end, which two bare processes do not show (tiny, measured here: 143.7 ms alone,
156.1 ms beside a stream, ×0.92, where the bare pair probe gives ×0.98–1.03).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from pathlib import Path

from epd.plan.servicelog import decode_steps, encoder_forwards, median_by_window

# (requests, output tokens, max concurrency) of each workload
TEXT_ONE = (24, 1, 2)
TEXT_SERIAL = (2, 96, 1)
TEXT_MANY = (8, 128, 4)
IMAGE_ONE = (12, 1, 2)
REPEATS = 3  # of every workload, interleaved; latencies are the median of the repetitions' medians
IMAGE_SIZE = (448, 448)
PROMPT_TOKENS = 12  # about what "request N: say something about the weather" tokenizes to


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from ``/proc/*/stat``)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parent[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _find_gateway(root: int) -> int:
    """The pid of the ``services.gateway`` process under ``root``.

    Raises:
        RuntimeError: none found.
    """
    for pid in _children(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"services.gateway" in f.read():
                    return pid
        except OSError:
            continue
    raise RuntimeError("front-end probe: no services.gateway process under epd up")


def cpu_s(pid: int) -> float:
    """CPU seconds ``pid`` has run, all its threads (``/proc/PID/task/*/schedstat``, ns)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def _requests(kind: tuple[int, int, int], images: bool, seed: int) -> list:
    from epd.bench.workloads import BenchRequest, jpeg_data_url, make_image

    n, tokens, _ = kind
    rng = random.Random(seed)
    out = []
    for i in range(n):
        urls, sizes = [], []
        if images:
            url, _ = jpeg_data_url(make_image(rng, *IMAGE_SIZE, 1000 + i))
            urls, sizes = [url], [IMAGE_SIZE]
        out.append(BenchRequest(prompt=f"request {i}: say something about the weather", images=urls,
                                max_tokens=tokens, image_sizes=sizes))
    return out


def _run(url: str, model: str, reqs: list, concurrency: int, gw: int) -> dict:
    """One workload: ``{"gateway_s", "client_s", "wall_s", "requests", "tokens", "mbytes"}``."""
    from epd.bench.client import RunConfig, run_requests

    cfg = RunConfig(base_url=url, model=model, max_concurrency=concurrency, ignore_eos=True, progress=False,
                    timeout_s=120.0)
    g0, c0, t0 = cpu_s(gw), time.thread_time(), time.perf_counter()
    run = asyncio.run(run_requests(cfg, reqs))
    g1, c1, t1 = cpu_s(gw), time.thread_time(), time.perf_counter()
    bad = [r.error for r in run.records if not r.success]
    if bad:
        raise RuntimeError(f"front-end probe: {len(bad)} request(s) failed, e.g. {bad[0]}")
    mbytes = sum(len(u) * 3 / 4 for r in reqs for u in r.images) / 1e6
    itl = sorted(g for r in run.records for g in r.itl)
    ttft = sorted(r.ttft for r in run.records)
    return {"gateway_s": g1 - g0, "client_s": c1 - c0, "wall_s": t1 - t0, "requests": len(reqs),
            "tokens": sum(r.output_tokens for r in run.records), "mbytes": mbytes,
            "itl_median_s": itl[len(itl) // 2] if itl else 0.0, "ttft_median_s": ttft[len(ttft) // 2],
            "concurrency": concurrency}


def _merge(reps: list[dict]) -> dict:
    """One workload's repetitions as one: totals summed, the median of their latency medians
    (the per-repetition medians kept under ``reps_itl_median_s`` / ``reps_ttft_median_s``)."""
    out: dict = {}
    for key in reps[0]:
        vals = [r[key] for r in reps]
        if key.endswith("_median_s"):
            out[key] = statistics.median(vals)
            out[f"reps_{key}"] = vals
        elif key == "concurrency":
            out[key] = vals[0]
        else:
            out[key] = sum(vals)
    return out


def _beside(url: str, model: str, seed: int) -> dict:
    """``text_serial``'s stream and ``image_one``'s images (new ones, one at a time, so the
    encoder runs one-image forwards back to back) at the same time: the stream's median
    inter-token latency and the images' median TTFT while the other runs, and ``window``:
    ``time.time()`` from the start to the stream's end (the encoder's forwards in it ran beside
    the decode). Two at a time, the encoder batches some and its forward-per-image figure beside
    the stream compared less cleanly with ``image_one``'s (three tiny profiles: ×0.74–0.85)."""
    from epd.bench.client import RunConfig, run_requests

    def cfg(c):
        return RunConfig(base_url=url, model=model, max_concurrency=c, ignore_eos=True, progress=False,
                         timeout_s=120.0)

    async def stream():
        res = await run_requests(cfg(TEXT_SERIAL[2]), _requests(TEXT_SERIAL, False, seed + 2))
        return res, time.time()

    async def both():
        return await asyncio.gather(stream(), run_requests(cfg(1), _requests(IMAGE_ONE, True, seed + 3)))

    t0 = time.time()
    (text, text_end), images = asyncio.run(both())
    itl = sorted(g for r in text.records for g in r.itl)
    ttft = sorted(r.ttft for r in images.records if r.success)
    if not itl or len(ttft) < len(images.records):
        raise RuntimeError("front-end probe: a request failed while the stream and the images ran together")
    return {"itl_median_s": itl[len(itl) // 2], "ttft_median_s": ttft[len(ttft) // 2], "window": (t0, text_end)}


def encode_beside_decode(runs: dict[str, dict]) -> float | None:
    """The encoder's speed (≤ 1) while the decode serves a stream, measured on the deployment: its
    median forward per image in ``image_one`` (alone) ÷ in ``beside`` (during the stream); None
    when the probe did not read both (an older profile, or fewer than 3 forwards beside)."""
    alone = runs.get("image_one", {}).get("encode_forward_ms")
    beside = runs.get("beside", {}).get("encode_forward_ms")
    if not alone or not beside:
        return None
    return min(1.0, alone / beside)


def decode_beside_encode(runs: dict[str, dict]) -> float:
    """The decode's speed (≤ 1) while the encoder serves, as the deployment shows it: the stream's
    median inter-token latency alone (``text_serial``) ÷ beside the images (``beside``).

    Recorded in the profile (``device.served_slowdown``) and used only as a floor under the bare
    pair's factor (:func:`epd.plan.calibrate.apply_probe`): the gap beside the images also holds
    the time-slicing with the gateway, the client and the prefill that the simulator already
    shares the cores for, so applying it as the factor counts that twice. Measured on six tiny
    profiles (0.59–0.75) against two 3-repeat sweeps, it put the simulated TPOT p50 10–95 % high,
    where the bare duty-cycled pair's factor (:mod:`epd.plan.slowdown`) gave 4.5–48 % on the same
    profiles. A bare factor below the gap is a disturbed pair round: the pair's interference
    alone cannot cost the decode more than the whole served gap.

    The images' TTFT beside the stream (kept in ``beside``) is not turned into an encoder factor
    either: it also holds the stream's front-end work and decode overhead; the encoder's own
    logged forwards are (:func:`encode_beside_decode`)."""
    return min(1.0, runs["text_serial"]["itl_median_s"] / runs["beside"]["itl_median_s"])


def solve(runs: dict[str, dict], idle_rate: float) -> dict[str, dict[str, float]]:
    """Per-request, per-delivery, per-token and per-MB CPU seconds of the gateway and the client
    from the workloads' totals (``_run``'s dicts under ``text_one``, ``text_serial``,
    ``text_many``, ``image_one``); the gateway's idle rate (CPU s per s) is taken off its totals.
    A *delivery* is one decode step's tokens reaching the loop together: one at a time in
    ``text_serial``, about ``TEXT_MANY[2]`` in ``text_many``. Every cost is ≥ 0."""
    out: dict[str, dict[str, float]] = {}
    one, serial, many, image = runs["text_one"], runs["text_serial"], runs["text_many"], runs["image_one"]
    for who, idle in (("gateway", idle_rate), ("client", 0.0)):
        def busy(w, who=who, idle=idle):
            return max(0.0, w[f"{who}_s"] - idle * w["wall_s"])
        per_req = busy(one) / one["requests"]  # one token each: request + one delivery of one token
        # after the first token: serial = n1·(step + token), many = n2·token + n2/c·step
        n1 = serial["tokens"] - serial["requests"]
        n2 = many["tokens"] - many["requests"]
        c1 = max(0.0, busy(serial) - per_req * serial["requests"]) / max(1, n1)  # step + token
        c2 = max(0.0, busy(many) - per_req * many["requests"]) / max(1, n2)  # token + step / c
        k = TEXT_MANY[2]
        step = max(0.0, (c1 - c2) * k / (k - 1))
        token = max(0.0, c1 - step)
        request = max(0.0, per_req - step - token)
        rest = busy(image) - image["requests"] * (request + step + token)
        mbyte = max(0.0, rest / image["mbytes"]) if image["mbytes"] else 0.0
        out[who] = {"request_s": request, "request_mbyte_s": mbyte, "delivery_s": step, "token_s": token}
    return out


def _probe_workload(prof, kind: tuple[int, int, int], run: dict, images: bool):
    """The simulator's copy of one probe workload (all sent at once, ``kind``'s concurrency)."""
    from epd.plan.workload import SimImage, SimRequest, SimWorkload

    n, tokens, conc = kind
    ims = ()
    if images:
        img_tokens, patches = prof.image_tokens(*IMAGE_SIZE)
        jpeg = int(run["mbytes"] * 1e6 / max(1, run["requests"]))
        ims = (SimImage(img_tokens, patches, IMAGE_SIZE[0] * IMAGE_SIZE[1], jpeg, ""),)
    prompt = int(prof.model.get("template_tokens", 0)) + PROMPT_TOKENS + sum(
        im.tokens + int(prof.model.get("image_wrap_tokens", 0)) for im in ims)
    reqs = [SimRequest(i, PROMPT_TOKENS, prompt, tokens,
                       tuple(SimImage(im.tokens, im.patches, im.src_pixels, im.jpeg_bytes, f"probe-{i}")
                             for im in ims)) for i in range(n)]
    return SimWorkload(reqs, "front-end probe", float("inf"), 1.0, 0, conc)


def decode_points(prof, runs: dict[str, dict]):
    """``(run name, run, decode_x features)`` of the probe's two decode streams: ``text_serial`` at
    batch 1 and ``text_many`` at batch ``TEXT_MANY[2]``, each at the context its requests had
    half-way through their output."""
    from epd.plan.profile import decode_x

    for name, batch in (("text_serial", 1), ("text_many", TEXT_MANY[2])):
        run = runs.get(name) or {}
        out = run.get("tokens", 0) / max(1, run.get("requests", 1))
        yield name, run, decode_x(batch, int(prof.model.get("template_tokens", 0) + PROMPT_TOKENS + out / 2))


def service_overheads(prof, runs: dict[str, dict], threads: int) -> dict[str, float]:
    """What the services spend beyond the engine's work, from the probe's runs on ``epd up``:

    - ``decode_step_s`` + ``decode_token_s`` × batch: the median inter-token latency of
      ``text_serial`` (batch 1) and ``text_many`` (batch ``TEXT_MANY[2]``) less the decode step
      the service itself timed in those runs (``decode_step_ms``, from its log), or, in a
      profile without it, ``prof``'s step at the context those requests had half-way
      (``threads``: the decode process's). The service's own time is taken at the same minute:
      against the engine's sample, a probe on a slow minute read 2.8 ms of "overhead" per step
      that the sweeps did not show;
    - ``prefill_request_s``: the median TTFT of ``text_one`` less the simulator's for the same
      requests (front end, hops, prefill forward — everything the model knows);
    - ``encode_image_s``: the same for ``image_one``, after ``prefill_request_s``, less what the
      encoder's logged forward (``encode_forward_ms``) exceeded the fitted forward by: a forward
      slower than the engine's sample is the host's state at that minute (measured here: 122.6,
      134.6 and 146.0 ms in three probes against samples of 121.7–125.5 ms), not a cost of the
      loop around it.

    Each is the receiving, dispatching, bookkeeping and sending around a forward that the
    engine-only profile does not see. All ≥ 0.
    """
    from dataclasses import replace

    from epd.plan.deployment import Deployment
    from epd.plan.sim import simulate

    over = []
    for _, run, x in decode_points(prof, runs):
        step = run["decode_step_ms"] / 1e3 if run.get("decode_step_ms") else prof.cost(
            "decode", threads, x)  # the served step's own time when the probe read it
        over.append(max(0.0, run["itl_median_s"] - step))
    token = max(0.0, (over[1] - over[0]) / (TEXT_MANY[2] - 1))
    got = {"decode_step_s": max(0.0, over[0] - token), "decode_token_s": token, "prefill_request_s": 0.0,
           "encode_image_s": 0.0}

    from scipy.optimize import brentq

    def sim_ttft(kind, name, images, key, value):
        trial = replace(prof, host={**prof.host, "service": {**got, key: value}})
        res = simulate(trial, Deployment("E-P-D"), _probe_workload(prof, kind, runs[name], images))
        ttft = sorted(r.ttft for r in res.records if r.success)
        return ttft[len(ttft) // 2]

    # the overhead that makes the simulated median TTFT the measured one (queueing at the probe's
    # concurrency makes it more than the plain difference)
    for key, kind, name, images in (("prefill_request_s", TEXT_ONE, "text_one", False),
                                    ("encode_image_s", IMAGE_ONE, "image_one", True)):
        want = runs[name]["ttft_median_s"]
        gap = lambda x, a=(kind, name, images, key), w=want: sim_ttft(*a, x) - w  # noqa: E731
        got[key] = 0.0 if gap(0.0) >= 0 else brentq(gap, 0.0, want, xtol=1e-5)
    if forward := runs["image_one"].get("encode_forward_ms"):  # its excess is the host's state, not the loop's
        from epd.cores import split_cores
        from epd.plan.profile import encode_x

        enc = prof.nearest_threads(split_cores([("encoder",), ("prefill",), ("decode",)],
                                               int(prof.device.get("cores", 1)))[0])
        _, patches = prof.image_tokens(*IMAGE_SIZE)
        fitted = prof.cost("encode", enc, encode_x([(patches, IMAGE_SIZE[0] * IMAGE_SIZE[1])]))
        got["encode_image_s"] = max(0.0, got["encode_image_s"] - max(0.0, forward / 1e3 - fitted))
    return got


def measure_front_end(model_dir: Path, dtype: str, seed: int = 0, log_dir: Path | None = None) -> dict:
    """Start ``epd up --topology E-P-D`` on ``model_dir`` and measure the front end's CPU costs.

    Returns:
        ``{"gateway": {"request_s", "request_mbyte_s", "delivery_s", "token_s"}, "client": {same},
        "front_end_runs": {workload: its totals}, "gateway_idle_cpu": CPU s per s}``; seconds of
        CPU per request, per MB of JPEG, per delivery (a decode step's tokens) and per token;
        ``image_one`` and ``beside`` also carry ``encode_forward_ms``, the encoder's median
        forward per image read from its log, and ``text_serial`` and ``text_many`` carry
        ``decode_step_ms``, the decode's median step (:mod:`epd.plan.servicelog`).

    Raises:
        EndpointError: the deployment did not start (its log is named); RuntimeError: a probe
        request failed.
    """
    import tempfile

    from epd.bench.compare import start_ours

    with tempfile.TemporaryDirectory(prefix="epd-frontend-") as tmp:
        run = start_ours(f"E-P-D@{dtype}", model_dir, Path(log_dir or tmp), 240.0)
        try:
            gw = _find_gateway(run.proc.pid)
            model = str(model_dir)
            runs = {"warm-up": _run(run.url, model, _requests((4, 4, 2), True, seed + 1), 2, gw)}
            g0, t0 = cpu_s(gw), time.perf_counter()
            time.sleep(1.0)
            idle = (cpu_s(gw) - g0) / (time.perf_counter() - t0)
            reps: dict[str, list[dict]] = {k: [] for k in ("text_one", "text_serial", "image_one", "beside")}
            windows: dict[str, list[tuple[float, float]]] = {k: [] for k in (*reps, "text_many")}
            reps["text_many"] = []
            for rep in range(REPEATS):  # interleaved, so a drift of the host's speed spreads over all
                s = seed + 10 * rep
                for name, kind, images in (("text_one", TEXT_ONE, False), ("text_serial", TEXT_SERIAL, False),
                                           ("text_many", TEXT_MANY, False), ("image_one", IMAGE_ONE, True)):
                    t0 = time.time()
                    reps[name].append(_run(run.url, model, _requests(kind, images, s), kind[2], gw))
                    windows[name].append((t0, time.time()))
                got = _beside(run.url, model, s)
                windows["beside"].append(got.pop("window"))
                reps["beside"].append(got)
            runs |= {name: _merge(found) for name, found in reps.items()}
        finally:
            run.stop()
        # the served forwards at the same minutes, from the services' own log lines
        for key, read, names in (("encode_forward_ms", encoder_forwards, ("image_one", "beside")),
                                 ("decode_step_ms", decode_steps, ("text_serial", "text_many"))):
            for name in names:
                every, per_rep = median_by_window(read(run.log, windows[name]))
                if every is not None:
                    runs[name][key], runs[name][f"reps_{key}"] = every, per_rep
    costs = solve(runs, idle)
    return {**costs, "front_end_runs": runs, "gateway_idle_cpu": idle}
