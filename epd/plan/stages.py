"""The simulated services: one class per role, each a SimPy process replaying that service's loop
(see :mod:`epd.plan.sim` for what each models and :class:`epd.plan.sim.Simulator` for the wiring).

Every instance runs its steps on its device (:class:`epd.plan.shared.SharedDevice`) with the
profile's cost of the step at its thread count; messages to other components go through the
simulator (``after_hop``, ``features_ready``, ``first_token``, ``tokens``, ``fail``).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epd.engine.blocks import BlockAllocator
from epd.engine.decode_scheduler import DecodeScheduler, PendingAlloc
from epd.plan.deployment import Placed
from epd.plan.profile import decode_x, encode_x, image_decode_x, prefill_x
from epd.plan.shared import SharedDevice
from epd.plan.workload import SimImage, SimRequest

if TYPE_CHECKING:
    from epd.plan.sim import Simulator

BLOCKS_GRACE_S = 2.0  # services/gateway/core.py: KV-block charge released this long after the first token


@dataclass
class ReqState:
    """A request's state across the simulated pipeline."""

    spec: SimRequest
    sent: float = 0.0
    route: str = ""
    prefill: PrefillSim | None = None
    decode: DecodeSim | None = None
    charges: list = field(default_factory=list)
    features_local: int = 0
    kv_alloc: bool = False
    generated: int = 0
    token_times: list[float] = field(default_factory=list)
    failed: str = ""
    status: int = 200
    done: bool = False
    slot: object = None  # the client's --max-concurrency slot


class Instance:
    """One role of one process: its device, threads, inbox wake-up and published load."""

    role = ""

    def __init__(self, sim: Simulator, placed: Placed, device: SharedDevice) -> None:
        self.sim = sim
        self.env = sim.env
        self.name = f"{placed.name}-{self.role}" if len(placed.roles) > 1 else placed.name
        self.threads = placed.threads
        self.device = device
        self.process = placed.name
        # on cpu, the roles of one process share its threads; on an accelerator they share the device only
        self.process_cap = float(placed.threads) if sim.kind == "cpu" else 0.0
        self.published: dict[str, float] = {}
        self.busy_s = 0.0
        self.work_s = 0.0  # the profile's cost of every step run, unstretched by sharing (CPU-seconds on cpu)
        self.steps = 0
        self.items = 0
        self._wake = self.env.event()
        self.env.process(self.loop())

    def wake(self) -> None:
        if not self._wake.triggered:
            self._wake.succeed()

    def idle(self):
        """Wait for the next message (the loop's poll)."""
        yield self._wake
        self._wake = self.env.event()

    def run(self, stage: str, x: dict[str, float], extra_s: float = 0.0):
        """One unit of ``stage`` work on this instance's device (a SimPy event); ``extra_s``: work
        of the service loop around it."""
        work = self.sim.prof.cost(stage, self.threads, x) + extra_s
        self.work_s += work
        return self.device.run(work, self.threads, self.name, self.process, self.process_cap, stage)

    def publish(self) -> None:
        self.published = self.load()

    def load(self) -> dict[str, float]:
        return {}

    def loop(self):
        yield self.env.timeout(0)


class EncoderSim(Instance):
    role = "encoder"

    def __init__(self, sim, placed, device) -> None:
        self.inbox: deque[tuple[ReqState, int]] = deque()
        self.queue: deque[tuple[ReqState, int]] = deque()
        self.pool: OrderedDict[str, int] = OrderedDict()  # mm_hash -> bytes (LRU)
        self.pool_bytes = 0
        self.hits = 0
        super().__init__(sim, placed, device)

    def load(self):
        return {"queued_patches": float(sum(r.spec.images[i].patches for r, i in self.queue))}

    def receive(self, req: ReqState, indices: list[int]) -> None:
        self.inbox.extend((req, i) for i in indices)
        self.wake()

    def loop(self):
        sim, lim = self.sim, self.sim.dep.limits
        while True:
            if not self.inbox and not self.queue:
                yield from self.idle()
                continue
            while self.inbox:  # dispatch every waiting message before the step
                req, i = self.inbox.popleft()
                if req.failed:
                    continue
                image = req.spec.images[i]
                if image.key in self.pool:
                    self.pool.move_to_end(image.key)
                    self.hits += 1
                    sim.features_ready(req, i, self)
                    continue
                t0 = self.env.now
                yield self.run("image_decode", image_decode_x(image.src_pixels))
                self.busy_s += self.env.now - t0
                self.queue.append((req, i))
            batch: list[tuple[ReqState, int]] = []
            patches = 0
            while self.queue and len(batch) < lim.encoder_max_images:
                cost = self.queue[0][0].spec.images[self.queue[0][1]].patches
                if batch and patches + cost > lim.encoder_max_patches:
                    break
                batch.append(self.queue.popleft())
                patches += cost
            batch = [(r, i) for r, i in batch if not r.failed and not sim.expired(r)]
            if not batch:
                continue
            t0 = self.env.now
            yield self.run("encode", encode_x([(r.spec.images[i].patches, r.spec.images[i].src_pixels)
                                               for r, i in batch]), sim.prof.overhead_s("encode", len(batch)))
            self.busy_s += self.env.now - t0
            self.steps += 1
            self.items += len(batch)
            for req, i in batch:
                self._put(req.spec.images[i])
                sim.features_ready(req, i, self)

    def _put(self, image: SimImage) -> None:
        if image.key in self.pool:
            self.pool.move_to_end(image.key)
            return
        nbytes = self.sim.prof.feature_bytes(image.tokens)
        cap = self.sim.dep.limits.feature_pool_mb << 20
        while self.pool and self.pool_bytes + nbytes > cap:
            key, size = self.pool.popitem(last=False)
            self.pool_bytes -= size
            if self.sim.cache.get(key) is self:
                del self.sim.cache[key]
        self.pool[image.key] = nbytes
        self.pool_bytes += nbytes
        self.sim.cache[image.key] = self


class PrefillSim(Instance):
    role = "prefill"

    def __init__(self, sim, placed, device) -> None:
        self.states: OrderedDict[int, ReqState] = OrderedDict()
        # the papers' EP baseline: this instance encodes its own requests' images inside its step
        self.coupled = sim.dep.ep_coupled and "encoder" in placed.roles
        self.link = SharedDevice(sim.env, 1.0, f"{placed.name}-link")  # one NIC/copy engine: transfers share it
        super().__init__(sim, placed, device)

    def load(self):
        return {"queued_tokens": float(sum(r.spec.prompt_tokens for r in self.states.values()))}

    def accept(self, req: ReqState) -> None:
        self.states[req.spec.index] = req
        self.sim.after_hop(lambda: req.decode.request_blocks(req))
        self.wake()

    def prefetch(self, req: ReqState, image: SimImage):
        """The one-sided READ of one image's features while the request waits."""
        yield self.link.run(self.sim.prof.transfer_s(self.sim.prof.feature_bytes(image.tokens)))
        req.features_local += 1
        self.wake()

    def loop(self):
        sim, lim = self.sim, self.sim.dep.limits
        while True:
            for req in [r for r in self.states.values() if r.failed or sim.expired(r)]:
                self.states.pop(req.spec.index, None)
                sim.fail(req, 504, "prefill: timed out")
            ready = [r for r in self.states.values()
                     if r.kv_alloc and (self.coupled or r.features_local == len(r.spec.images))]
            if not ready:
                yield from self.idle()
                continue
            batch, total = [], 0
            for r in ready:  # services/prefill/core.py pick_batch: oldest first, within the token budget
                if batch and total + r.spec.prompt_tokens > lim.prefill_max_tokens:
                    break
                batch.append(r)
                total += r.spec.prompt_tokens
            t_step = self.env.now
            if self.coupled:  # encode every image of the batch first, in the same engine step
                images = [im for r in batch for im in r.spec.images]
                if images:
                    yield self.run("encode", encode_x([(im.patches, im.src_pixels) for im in images]),
                                   self.sim.prof.overhead_s("encode", len(images)))
            t0 = self.env.now
            yield self.run("prefill", prefill_x([r.spec.prompt_tokens for r in batch],
                                                sum(len(r.spec.images) for r in batch)),
                           self.sim.prof.overhead_s("prefill", len(batch)))
            forward = self.env.now - t0
            self.steps += 1
            self.items += len(batch)
            for r in batch:
                sim.first_token(r)
            exposed = self.kv_exposed(batch, forward)
            if exposed > 0:
                yield self.env.timeout(exposed)  # KvConnector.wait_for_save: the engine waits for the last writes
            self.busy_s += self.env.now - t_step
            for r in batch:
                self.states.pop(r.spec.index, None)
                if r.spec.max_tokens > 1:
                    sim.after_hop(lambda r=r: r.decode.kv_ready(r))
                else:
                    sim.after_hop(lambda r=r: r.decode.release(r))

    def kv_exposed(self, batch: list[ReqState], forward: float) -> float:
        """Seconds of KV writing left after the forward (EPD-Serve §3.3's layer-grouped transfer).

        Group ``g`` of ``G`` layers is staged when the forward has run ``(g+1)/n_groups`` of its
        time; its writes (one per layer, K/V and run of blocks, per request) then go out in order
        on the link. ``G = 0`` writes everything after the forward.
        """
        prof = self.sim.prof
        layers = prof.model["num_layers"]
        g = self.sim.dep.limits.kv_layer_group
        groups = 1 if g <= 0 else math.ceil(layers / g)
        per_group_layers = layers if g <= 0 else g
        tokens = sum(r.spec.prompt_tokens for r in batch if r.spec.max_tokens > 1)
        if tokens == 0:
            return 0.0
        nbytes = tokens * prof.kv_bytes_per_token * per_group_layers / layers
        calls = 2 * per_group_layers * len(batch)
        x = prof.transfer_s(nbytes) + (calls - 1) * prof.transfer.coef.get("base", 0.0)
        done = 0.0
        for k in range(groups):
            avail = forward if g <= 0 else forward * (k + 1) / groups
            done = max(done, avail) + x
        return max(0.0, done - forward)


class DecodeSim(Instance):
    """A decode instance on the real :class:`~epd.engine.decode_scheduler.DecodeScheduler` (FIFO
    block reservations above the watermark, continuous batching in join order, one block more
    when one fills, preemption of the youngest) over a :class:`~epd.engine.blocks.BlockAllocator`
    of the instance's pool; only the step's duration comes from the profile."""

    role = "decode"

    def __init__(self, sim, placed, device) -> None:
        lim = sim.dep.limits
        self.block_size = lim.kv_block_size
        self.num_blocks = sim.kv_blocks(placed)
        self.sched = DecodeScheduler(BlockAllocator(self.num_blocks), self.block_size, lim.decode_max_batch)
        self.waiting: dict[str, ReqState] = {}  # queued for blocks, by scheduler request id
        self.preempted = 0
        self.batch_sum = 0
        super().__init__(sim, placed, device)

    def load(self):
        return {"running": float(len(self.sched.running)), "free_blocks": float(self.sched.allocator.num_free)}

    def blocks_for(self, tokens: int) -> int:
        return self.sched.blocks_for(tokens)

    def request_blocks(self, req: ReqState) -> None:
        try:
            self.sched.enqueue(PendingAlloc(str(req.spec.index), req.spec.prompt_tokens, math.inf, ""))
        except ValueError:
            self.sim.fail(req, 507, "decode: prompt larger than the KV pool")
            return
        self.waiting[str(req.spec.index)] = req
        self.wake()

    def kv_ready(self, req: ReqState) -> None:
        if req.failed or str(req.spec.index) not in self.sched.reserved:
            return
        self.sched.start(str(req.spec.index), 0, 0, 0.0, req)
        req.generated = 1
        self.wake()

    def release(self, req: ReqState) -> None:
        self.waiting.pop(str(req.spec.index), None)
        self.sched.release(str(req.spec.index))
        self.wake()  # freed blocks may admit a queued reservation

    def loop(self):
        sim, sched = self.sim, self.sched
        while True:
            while sched.queue and self.waiting[sched.queue[0].request_id].failed:
                self.waiting.pop(sched.queue.popleft().request_id)  # failed while waiting for blocks
            for dr in sched.admit():
                req = self.waiting.pop(dr.request_id)
                sim.after_hop(lambda r=req: sim.kv_allocated(r))
            for dr in [d for d in sched.running.values() if d.ctx.failed]:
                sched.release(dr.request_id)
            batch, preempted = sched.schedule()
            for dr in preempted:
                self.preempted += 1
                sim.fail(dr.ctx, 507, "decode: preempted, KV cache exhausted")
            if not batch:
                yield from self.idle()
                continue
            t0 = self.env.now
            yield self.run("decode", decode_x(len(batch), max(d.past_len + 1 for d in batch)),
                           sim.prof.overhead_s("decode", len(batch)))
            self.busy_s += self.env.now - t0
            self.steps += 1
            self.batch_sum += len(batch)
            for dr in batch:
                dr.past_len += 1
                dr.ctx.generated += 1
                if dr.ctx.generated >= dr.ctx.spec.max_tokens:
                    sched.release(dr.request_id)
            sim.tokens([d.ctx for d in batch])
