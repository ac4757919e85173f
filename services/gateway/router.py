"""Route and instance choice at the gateway (DESIGN.md §3, §5; EPD-Serve §3.4).

Routes (returned to the client in header ``x-epd-route``):

- ``text``: no images — P → D;
- ``encode``: no image is in the feature cache — E → P → D, the images split across encoders;
- ``cached``: every image's features are live in a holder's pool — P → D, prefill READs them;
- ``mixed``: some images cached, the rest encoded.

The gateway keeps a local view of the registry, refreshed in the background, and adds its
own in-flight charges so a burst between two refreshes does not herd onto one instance.
Least-loaded choice per stage with a stage-specific cost:

- encoder: pending image patches (``h/14 · w/14`` per image): view ``queued_patches`` + charges;
- prefill: queued prompt tokens: view ``queued_tokens`` + charges;
- decode: running requests: view ``running`` + charges; an instance whose free KV blocks
  (view ``free_blocks`` minus blocks this gateway charged recently) cannot hold prompt +
  ``max_tokens`` is not chosen.

Encoder and prefill charges are released at the request's first token (their work is done
then); decode's request charge at the end. The KV-block charge covers the gap until decode's
own heartbeat shows the reservation, so it is released a grace period after the first token.
Instances whose heartbeat expired are absent from the view, hence never chosen; so are
draining ones (alive, finishing their requests) and *suspects*: an incarnation a stage or a
send reported unreachable is not chosen for a while (about two TTLs, by then the registry has
dropped a dead one), so a retry does not land on the instance that just failed. Suspicion is
of one incarnation: a restarted instance is usable at once, and a wrongly suspected one again
after the while.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from epd.registry.registry import InstanceInfo

logger = logging.getLogger(__name__)

STAGES = ("encoder", "prefill", "decode")


class NoInstance(RuntimeError):
    """No live instance of a needed role (503), or every one is saturated (429)."""

    def __init__(self, role: str, why: str = "", saturated: bool = False) -> None:
        super().__init__(f"no {role} instance available{': ' + why if why else ''}")
        self.role = role
        self.saturated = saturated


@dataclass
class Charge:
    """A cost this gateway added to one instance for one request."""

    stage: str
    instance_id: str
    cost: float
    blocks: int = 0


@dataclass
class Plan:
    """Where one request goes.

    Attributes:
        route: ``text`` | ``encode`` | ``cached`` | ``mixed``.
        encoders: encoder instance id → indices of the request's images it encodes.
        cached: indices of the images whose features are read from a holder's pool.
        charges: in-flight charges not yet released.
    """

    route: str
    prefill: InstanceInfo
    decode: InstanceInfo
    encoders: dict[str, list[int]] = field(default_factory=dict)
    cached: list[int] = field(default_factory=list)
    holders: set[str] = field(default_factory=set)  # encoders asked for cached images (they lease them)
    charges: list[Charge] = field(default_factory=list)


class Router:
    """Chooses instances from a registry snapshot plus local in-flight charges."""

    def __init__(self) -> None:
        self.instances: dict[str, list[InstanceInfo]] = {s: [] for s in STAGES}
        self.inflight: dict[str, float] = defaultdict(float)
        self.inflight_blocks: dict[str, int] = defaultdict(int)
        self.by_id: dict[str, InstanceInfo] = {}
        self.suspects: dict[str, tuple[str, float]] = {}  # id -> (incarnation, monotonic end of suspicion)

    def update(self, snapshot: list[InstanceInfo]) -> None:
        """Replace the view with a fresh registry snapshot (live instances only)."""
        view: dict[str, list[InstanceInfo]] = {s: [] for s in STAGES}
        for info in snapshot:
            for role in info.roles:
                if role in view:
                    view[role].append(info)
        self.instances = view
        self.by_id = {i.instance_id: i for i in snapshot}
        now = time.monotonic()
        self.suspects = {i: (inc, until) for i, (inc, until) in self.suspects.items()
                         if until > now and i in self.by_id and self.by_id[i].incarnation == inc}

    def is_live(self, instance_id: str) -> bool:
        return instance_id in self.by_id

    def is_usable(self, instance_id: str) -> bool:
        """Live, not draining and not a suspect: may be given new work."""
        info = self.by_id.get(instance_id)
        return info is not None and self._usable(info)

    def _usable(self, info: InstanceInfo) -> bool:
        if info.draining:
            return False
        inc, until = self.suspects.get(info.instance_id, ("", 0.0))
        return inc != info.incarnation or until <= time.monotonic()

    def suspect(self, instance_id: str, incarnation: str, for_s: float) -> bool:
        """Stop choosing incarnation ``incarnation`` of ``instance_id`` for ``for_s`` seconds.
        A no-op (False) when the view holds another incarnation (that life is already over)
        or none."""
        info = self.by_id.get(instance_id)
        if info is None or info.incarnation != incarnation:
            return False
        self.suspects[instance_id] = (incarnation, time.monotonic() + for_s)
        return True

    def _cost(self, info: InstanceInfo, key: str) -> float:
        return info.load.get(key, 0.0) + self.inflight[info.instance_id]

    def _least(self, role: str, cost_key: str, room=None) -> InstanceInfo:
        live = [i for i in self.instances[role] if self._usable(i)]
        if not live:
            why = "none registered" if not self.instances[role] else "every instance is draining or unreachable"
            raise NoInstance(role, why)
        candidates = [i for i in live if room is None or room(i)]
        if not candidates:
            raise NoInstance(role, "every instance is full", saturated=True)
        return min(candidates, key=lambda i: (self._cost(i, cost_key), i.instance_id))

    def blocks_needed(self, info: InstanceInfo, num_tokens: int) -> int:
        bs = info.capacity.get("block_size", 0)
        return -(-num_tokens // bs) if bs else 0

    def plan(self, num_prompt_tokens: int, max_tokens: int, image_patches: list[int],
             cached: set[int] | frozenset = frozenset()) -> Plan:
        """Pick prefill, decode and (for uncached images) encoders; charges in-flight costs.

        Args:
            num_prompt_tokens: prompt length after placeholder expansion.
            max_tokens: generation budget (decode must have blocks for prompt + this).
            image_patches: patches per image (the cost of encoding it), in prompt order.
            cached: indices of images whose features are live in the cache (not encoded).

        Raises:
            NoInstance: a needed role has no live instance, or none with room.
        """
        total = num_prompt_tokens + max_tokens

        def decode_has_room(info: InstanceInfo) -> bool:
            free = info.load.get("free_blocks")
            if free is None:
                return True
            return free - self.inflight_blocks[info.instance_id] >= self.blocks_needed(info, total)

        to_encode = [i for i in range(len(image_patches)) if i not in cached]
        if to_encode and not any(self._usable(i) for i in self.instances["encoder"]):
            raise NoInstance("encoder", "none registered" if not self.instances["encoder"] else "none usable")
        prefill = self._least("prefill", "queued_tokens")
        decode = self._least("decode", "running", decode_has_room)
        if not image_patches:
            route = "text"
        elif not to_encode:
            route = "cached"
        else:
            route = "encode" if len(to_encode) == len(image_patches) else "mixed"
        plan = Plan(route=route, prefill=prefill, decode=decode, cached=sorted(cached))
        self._charge(plan, Charge("prefill", prefill.instance_id, float(num_prompt_tokens)))
        self._charge(plan, Charge("decode", decode.instance_id, 1.0, self.blocks_needed(decode, total)))
        for index in to_encode:  # intra-request parallelism: each image to the least-loaded encoder
            enc = self._least("encoder", "queued_patches")
            plan.encoders.setdefault(enc.instance_id, []).append(index)
            self._charge(plan, Charge("encoder", enc.instance_id, float(image_patches[index])))
        return plan

    def _charge(self, plan: Plan, charge: Charge) -> None:
        self.inflight[charge.instance_id] += charge.cost
        self.inflight_blocks[charge.instance_id] += charge.blocks
        plan.charges.append(charge)

    def release(self, plan: Plan, stages: tuple[str, ...] = STAGES) -> None:
        """Undo the plan's charges on ``stages`` (request cost only; see :meth:`release_blocks`)."""
        for charge in plan.charges:
            if charge.stage in stages and charge.cost:
                self.inflight[charge.instance_id] = max(0.0, self.inflight[charge.instance_id] - charge.cost)
                charge.cost = 0.0

    def release_blocks(self, plan: Plan) -> None:
        """Undo the plan's KV-block charge (decode's heartbeat now shows the reservation)."""
        for charge in plan.charges:
            if charge.blocks:
                self.inflight_blocks[charge.instance_id] = max(0, self.inflight_blocks[charge.instance_id]
                                                               - charge.blocks)
                charge.blocks = 0

    def charged(self) -> dict[str, float]:
        """Current in-flight cost per instance (for metrics)."""
        return {k: v for k, v in self.inflight.items() if v}
