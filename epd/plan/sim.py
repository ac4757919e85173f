"""Discrete-event simulation of a whole deployment (SimPy), driven by a profile.

It replays the services' own policies, step by step, with each step's duration taken from the
profile's cost models (:mod:`epd.plan.profile`) and stretched by device sharing
(:class:`epd.plan.shared.SharedDevice`):

- **client** — ``epd bench serve``'s arrivals (same seed, gamma gaps, ``--max-concurrency``);
- **gateway** (one asyncio loop: a FIFO server on the front-end's device) — per request the
  parse/hash/template cost, then :class:`SimRouter` picks instances as
  ``services/gateway/router.py`` does: least-loaded (registry view refreshed every
  ``registry_refresh_s`` from loads published every ``heartbeat_s``, plus the gateway's own
  in-flight charges, released at the first token; decode must have free blocks for prompt +
  ``max_tokens``) or round-robin; each image of a request goes to the least-loaded encoder in
  turn (intra-request parallelism, IRP); images whose ``mm_hash`` is published go to their
  holder (cached route);
- **front end** — the gateway's asyncio loop and the client's are two serial servers on the
  host (:meth:`Profile.front`: CPU per request and per MB of image on the way in; per delivery —
  one decode step's tokens — and per token on the way out). A request is timed from when the
  client starts sending it; a token when the client's loop reads it;
- **encoder** (``services/encoder/proc.py``) — its loop drains its inbox (decoding each JPEG,
  answering pool hits at once) then encodes the oldest queued images within
  ``EPD_ENCODER_MAX_IMAGES`` / ``EPD_ENCODER_MAX_PATCHES``; finished features enter its pool
  (LRU by bytes) and the cache index, and ``FeaturesReady`` goes to prefill;
- **prefill** (``services/prefill/proc.py``) — accepts at once, asks decode for blocks,
  prefetches each image's features (a one-sided read on its link) while the request waits;
  a step packs the oldest ready requests under ``EPD_PREFILL_MAX_TOKENS``
  (``pick_batch``), sends the first tokens at the end of the forward, then waits for the KV
  writes still outstanding — layer groups of ``EPD_KV_LAYER_GROUP`` are written while later
  layers compute, so only the tail is exposed — and hands off (``KvReady``);
- **decode** (``epd/engine/decode_scheduler.py``) — FIFO block reservations above a watermark
  of one free block per running request, continuous batching of up to
  ``EPD_DECODE_MAX_BATCH`` requests in join order, one more block when a request's last fills,
  preemption (a failed request) of the youngest when none is free.

Every control message costs one ``hop_s`` of latency. Requests run to ``max_tokens`` (the
validation runs use ``--ignore-eos``). The result is a list of
:class:`epd.bench.metrics.RequestRecord`, so figures come from the benchmark's own code.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import simpy

from epd.bench.metrics import RequestRecord
from epd.plan.deployment import Deployment, Placed
from epd.plan.profile import Profile
from epd.plan.router import SimRouter
from epd.plan.shared import SharedDevice
from epd.plan.stages import BLOCKS_GRACE_S, DecodeSim, EncoderSim, Instance, PrefillSim, ReqState
from epd.plan.workload import SimWorkload


@dataclass
class SimResult:
    """What one simulated run produced.

    Attributes:
        records: one :class:`RequestRecord` per request, as ``epd bench serve`` records them.
        duration_s: first send → last response end.
        stats: per-instance utilisation and batch sizes, feature-cache hits, preemptions.
    """

    records: list[RequestRecord]
    duration_s: float
    stats: dict


class Simulator:
    """One run of ``workload`` at ``rate`` on ``dep`` with ``prof``'s costs.

    Args:
        prof: the profile.
        dep: the deployment.
        workload: requests + arrival settings.
        rate: request rate (default: the workload's); ``inf`` sends all at once.
    """

    def __init__(self, prof: Profile, dep: Deployment, workload: SimWorkload, rate: float | None = None) -> None:
        self.prof, self.dep, self.workload = prof, dep, workload
        self.rate = workload.request_rate if rate is None else rate
        self.env = simpy.Environment()
        self.kind = prof.device.get("kind", "cpu")
        self.cores = dep.cores or int(prof.device.get("cores", 1))
        placed = dep.place(self.kind, self.cores)
        if self.kind == "cpu":  # effective cores: what this host gives busy processes at once (epd.plan.parallel)
            eff = float(prof.device.get("parallel_efficiency", 1.0)) if self.cores > 1 else 1.0
            curve = prof.device.get("parallel_capacity") if self.cores == int(prof.device.get("cores", 0)) else None
            host = SharedDevice(self.env, self.cores * eff, "host", capacity_curve=curve,
                                group_efficiency=float(prof.device.get("process_colocation_efficiency", 1.0)),
                                slowdown=prof.device.get("slowdown"))
            self.devices = {0: host}
            self.front_device = host
        else:
            eff = float(prof.device.get("colocation_efficiency", 1.0))
            self.devices = {p.device: SharedDevice(self.env, 1.0, f"device-{p.device}", eff) for p in placed}
            self.front_device = SharedDevice(self.env, float(prof.device.get("host_cores", 16)), "host")
        self.cache: dict[str, EncoderSim] = {}
        self.encoders: list[EncoderSim] = []
        self.prefills: list[PrefillSim] = []
        self.decodes: list[DecodeSim] = []
        self.placed = placed
        for p in placed:
            for role in p.roles:
                if role == "encoder" and dep.ep_coupled and "prefill" in p.roles:
                    continue  # the prefill engine of this process encodes
                cls = {"encoder": EncoderSim, "prefill": PrefillSim, "decode": DecodeSim}[role]
                inst = cls(self, p, self.devices[p.device])
                {"encoder": self.encoders, "prefill": self.prefills, "decode": self.decodes}[role].append(inst)
        self.instances: list[Instance] = [*self.encoders, *self.prefills, *self.decodes]
        self.router = SimRouter(self, dep.routing)
        self.reqs = [ReqState(s) for s in workload.requests]
        self.remaining = len(self.reqs)
        self.all_done = self.env.event()
        self.gateway = _Serial(self.env, self.front_device, "gateway")
        self.client = _Serial(self.env, self.front_device, "client")
        self.gw_cost, self.client_cost = prof.front("gateway"), prof.front("client")
        self.env.process(self._publisher())
        self.env.process(self._refresher())
        self.concurrency = simpy.Resource(self.env, workload.max_concurrency) if workload.max_concurrency else None

    # -- sizes -----------------------------------------------------------------------------
    def kv_blocks(self, placed: Placed) -> int:
        """Blocks of a decode instance: ``kv_blocks``, else ``kv_memory_mb`` (cpu), else the
        device memory (90 %) left after the weights of every process on its device."""
        lim, prof = self.dep.limits, self.prof
        per_block = prof.kv_bytes_per_token * lim.kv_block_size
        if lim.kv_blocks:
            return lim.kv_blocks
        if self.kind == "cpu":
            return max(2, (lim.kv_memory_mb << 20) // per_block)
        weights = prof.model.get("weights_bytes", {})
        on_device = [p for p in self.placed if p.device == placed.device] if hasattr(self, "placed") else [placed]
        used = 0
        for p in on_device:
            if "encoder" in p.roles:
                used += weights.get("vision", 0) + prof.device.get("encoder_activation_bytes", 0)
            if "prefill" in p.roles or "decode" in p.roles:
                used += weights.get("language", 0)
            if "prefill" in p.roles:
                used += prof.device.get("prefill_activation_bytes", 0)
        free = 0.9 * prof.device.get("memory_bytes", 0) - used
        return max(2, int(free // per_block))

    # -- messages between components ---------------------------------------------------------
    def after_hop(self, fn) -> None:
        """Run ``fn`` one control-message hop from now."""
        def go():
            yield self.env.timeout(self.prof.host["hop_s"])
            fn()
        self.env.process(go())

    def expired(self, req: ReqState) -> bool:
        return self.env.now - req.sent > self.dep.request_timeout_s

    def features_ready(self, req: ReqState, index: int, encoder: EncoderSim) -> None:
        def go():
            yield self.env.timeout(self.prof.host["hop_s"])
            if not req.failed and req.prefill is not None:
                yield from req.prefill.prefetch(req, req.spec.images[index])
        self.env.process(go())

    def kv_allocated(self, req: ReqState) -> None:
        req.kv_alloc = True
        if req.prefill is not None:
            req.prefill.wake()

    def first_token(self, req: ReqState) -> None:
        def deliver():
            if req.failed:
                return
            req.token_times.append(self.env.now)
            self.router.release(req, ("encoder", "prefill"))
            self.env.process(self._later(BLOCKS_GRACE_S, lambda: self.router.release_blocks(req)))
            if req.spec.max_tokens <= 1:
                self._finish(req)
        self.after_hop(lambda: self._out(1, deliver))

    def tokens(self, batch: list[ReqState]) -> None:
        def deliver():
            for req in batch:
                if req.failed or req.done:
                    continue
                req.token_times.append(self.env.now)
                if len(req.token_times) >= req.spec.max_tokens:
                    self._finish(req)
        self.after_hop(lambda: self._out(len(batch), deliver))

    def _out(self, n: int, deliver) -> None:
        """``n`` tokens of one decode step through the gateway's loop, then the client's (timed
        as the client reads them, before it parses them)."""
        g, c = self.gw_cost, self.client_cost
        self.gateway.submit(g["delivery_s"] + g["token_s"] * n,
                            lambda: self.client.submit(c["delivery_s"] + c["token_s"] * n, deliver, first=True))

    def fail(self, req: ReqState, status: int, why: str) -> None:
        if req.failed or req.done:
            return
        req.failed, req.status = why, status
        if req.decode is not None:
            req.decode.release(req)
        self._end(req)

    def _finish(self, req: ReqState) -> None:
        req.done = True
        self._end(req)

    def _end(self, req: ReqState) -> None:
        self.router.release(req, ("encoder", "prefill", "decode"))
        self.router.release_blocks(req)
        if self.concurrency is not None and req.slot is not None:
            self.concurrency.release(req.slot)
        self.remaining -= 1
        if self.remaining == 0 and not self.all_done.triggered:
            self.all_done.succeed()

    def _later(self, delay: float, fn):
        yield self.env.timeout(delay)
        fn()

    def _publisher(self):
        while True:
            for inst in self.instances:
                inst.publish()
            yield self.env.timeout(self.dep.heartbeat_s)

    def _refresher(self):
        while True:
            self.router.refresh()
            yield self.env.timeout(self.dep.registry_refresh_s)

    # -- requests ----------------------------------------------------------------------------
    def _client(self, req: ReqState, due: float):
        yield self.env.timeout(due)
        if self.concurrency is not None:
            slot = self.concurrency.request()
            yield slot
            req.slot = slot
        req.sent = self.env.now
        mb = sum(im.jpeg_bytes for im in req.spec.images) / 1e6
        g, c = self.gw_cost, self.client_cost
        self.client.submit(c["request_s"] + c["request_mbyte_s"] * mb,
                           lambda: self.gateway.submit(g["request_s"] + g["request_mbyte_s"] * mb,
                                                       lambda: self._admit(req)))

    def _admit(self, req: ReqState) -> None:
        assign = self.router.plan(req)
        if assign is None:
            self.fail(req, 429, "no decode instance has room")
            return

        def send():
            req.prefill.accept(req)
            for enc, indices in assign.items():
                enc.receive(req, indices)
        self.after_hop(send)

    def run(self) -> SimResult:
        """Simulate until every request finished or failed."""
        for req, due in zip(self.reqs, self.workload.arrivals(self.rate), strict=True):
            self.env.process(self._client(req, float(due)))
        if self.reqs:
            self.env.run(until=self.all_done)
        records = []
        for req in self.reqs:
            times = req.token_times
            ok = not req.failed and len(times) >= req.spec.max_tokens
            rec = RequestRecord(success=ok, status=req.status if not ok else 200, error=req.failed,
                                sent_at=req.sent, prompt_len=req.spec.prompt_len, route=req.route)
            if ok:
                rec.ttft = times[0] - req.sent
                rec.itl = [b - a for a, b in zip(times, times[1:], strict=False)]
                rec.latency = times[-1] - req.sent
                rec.output_tokens = len(times)
            records.append(rec)
        end = max((r.sent_at + r.latency for r in records), default=0.0)
        return SimResult(records, max(end, 1e-9), self.stats(end))

    def stats(self, end: float) -> dict:
        end = max(end, 1e-9)
        out = {"instances": {}, "feature_cache_hits": sum(e.hits for e in self.encoders),
               "preempted": sum(d.preempted for d in self.decodes), "front_busy": self.gateway.busy_s / end,
               "client_busy": self.client.busy_s / end}
        for inst in self.instances:
            row = {"busy": inst.busy_s / end, "work_s": inst.work_s, "steps": inst.steps, "threads": inst.threads}
            if isinstance(inst, DecodeSim):
                row["mean_batch"] = inst.batch_sum / max(1, inst.steps)
                row["kv_blocks"] = inst.num_blocks
            elif inst.steps:
                row["mean_batch"] = inst.items / inst.steps
            out["instances"][inst.name] = row
        return out


class _Serial:
    """One single-threaded loop (the gateway's or the client's asyncio loop) on ``device``: jobs
    run one at a time in arrival order, each ``work`` CPU seconds stretched by device sharing."""

    def __init__(self, env: simpy.Environment, device: SharedDevice, name: str) -> None:
        self.env, self.device, self.name = env, device, name
        self.queue: deque = deque()
        self.wake = env.event()
        self.busy_s = 0.0
        env.process(self._loop())

    def submit(self, work: float, then, first: bool = False) -> None:
        """Queue ``work``; call ``then()`` when it is done (``first``: when it starts)."""
        self.queue.append((work, then, first))
        if not self.wake.triggered:
            self.wake.succeed()

    def _loop(self):
        while True:
            if not self.queue:
                yield self.wake
                self.wake = self.env.event()
                continue
            work, then, first = self.queue.popleft()
            if first:
                then()
            t0 = self.env.now
            yield self.device.run(work, 1.0, self.name, stage="front")
            self.busy_s += self.env.now - t0
            if not first:
                then()


def simulate(prof: Profile, dep: Deployment, workload: SimWorkload, rate: float | None = None) -> SimResult:
    """Run one simulation (see :class:`Simulator`)."""
    return Simulator(prof, dep, workload, rate).run()
