"""Route and instance choice at the gateway (DESIGN.md §3, §5; EPD-Serve §3.4).

The gateway keeps a local view of the registry, refreshed in the background, and adds its
own in-flight counts so a burst between two refreshes does not herd onto one instance.
Least-loaded choice per stage with a stage-specific cost:

- encoder: pending image patches (``h/28 · w/28`` per image);
- prefill: queued prompt tokens;
- decode: running requests; an instance without enough free KV blocks is skipped.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from epd.registry.registry import InstanceInfo

logger = logging.getLogger(__name__)


class NoInstance(RuntimeError):
    """No live instance of a needed role (gateway answers 503)."""

    def __init__(self, role: str, why: str = "") -> None:
        super().__init__(f"no {role} instance available{': ' + why if why else ''}")
        self.role = role


@dataclass
class Plan:
    """Where one request goes.

    Attributes:
        route: ``text`` | ``encode``.
        encoders: encoder instance → indices of the request's images it encodes.
    """

    route: str
    prefill: InstanceInfo
    decode: InstanceInfo
    encoders: dict[str, list[int]] = field(default_factory=dict)
    costs: list[tuple[str, float]] = field(default_factory=list)  # (instance id, cost) charged


class Router:
    """Chooses instances from a registry snapshot plus local in-flight charges."""

    def __init__(self) -> None:
        self.instances: dict[str, list[InstanceInfo]] = {"encoder": [], "prefill": [], "decode": []}
        self.inflight: dict[str, float] = defaultdict(float)
        self.by_id: dict[str, InstanceInfo] = {}

    def update(self, snapshot: list[InstanceInfo]) -> None:
        """Replace the view with a fresh registry snapshot."""
        view: dict[str, list[InstanceInfo]] = {"encoder": [], "prefill": [], "decode": []}
        for info in snapshot:
            for role in info.roles:
                if role in view:
                    view[role].append(info)
        self.instances = view
        self.by_id = {i.instance_id: i for i in snapshot}

    def _least(self, role: str, cost_key: str, extra_ok=None) -> InstanceInfo:
        candidates = [i for i in self.instances[role] if extra_ok is None or extra_ok(i)]
        if not candidates:
            raise NoInstance(role, "" if self.instances[role] else "none registered")
        return min(candidates, key=lambda i: (i.load.get(cost_key, 0.0) + self.inflight[i.instance_id],
                                              i.instance_id))

    def plan(self, num_prompt_tokens: int, max_tokens: int, image_patches: list[int]) -> Plan:
        """Pick prefill, decode and (for images) encoders; charges in-flight costs.

        Args:
            num_prompt_tokens: prompt length after placeholder expansion.
            max_tokens: generation budget (decode must have blocks for prompt + this).
            image_patches: patches per image (cost of encoding it).

        Raises:
            NoInstance: a needed role has no live (or no roomy) instance.
        """

        def decode_has_room(info: InstanceInfo) -> bool:
            bs = info.capacity.get("block_size", 0)
            free = info.load.get("free_blocks")
            if not bs or free is None:
                return True
            return free >= -(-(num_prompt_tokens + max_tokens) // bs)

        prefill = self._least("prefill", "queued_tokens")
        decode = self._least("decode", "running", decode_has_room)
        plan = Plan(route="encode" if image_patches else "text", prefill=prefill, decode=decode)
        plan.costs = [(prefill.instance_id, float(num_prompt_tokens)), (decode.instance_id, 1.0)]
        for cost_id, cost in plan.costs:
            self.inflight[cost_id] += cost
        for index, patches in enumerate(image_patches):  # intra-request parallelism
            enc = self._least("encoder", "queued_patches")
            plan.encoders.setdefault(enc.instance_id, []).append(index)
            self.inflight[enc.instance_id] += patches
            plan.costs.append((enc.instance_id, float(patches)))
        return plan

    def release(self, plan: Plan) -> None:
        """Undo the plan's in-flight charges (request finished, failed or aborted)."""
        for cost_id, cost in plan.costs:
            self.inflight[cost_id] = max(0.0, self.inflight[cost_id] - cost)
        plan.costs = []
