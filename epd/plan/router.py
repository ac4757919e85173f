"""The gateway's instance choice (``services/gateway/router.py``) on simulated instances."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from epd.plan.stages import DecodeSim, EncoderSim, Instance, ReqState

if TYPE_CHECKING:
    from epd.plan.sim import Simulator


class SimRouter:
    """The gateway's instance choice (``services/gateway/router.py``) on the simulated instances."""

    def __init__(self, sim: Simulator, policy: str) -> None:
        self.sim = sim
        self.policy = policy
        self.inflight: dict[str, float] = defaultdict(float)
        self.inflight_blocks: dict[str, int] = defaultdict(int)
        self.view: dict[str, dict[str, float]] = {}
        self.rr: dict[str, int] = defaultdict(int)

    def refresh(self) -> None:
        self.view = {i.name: dict(i.published) for i in self.sim.instances}

    def _cost(self, inst: Instance, key: str) -> float:
        return self.view.get(inst.name, {}).get(key, 0.0) + self.inflight[inst.name]

    def _pick(self, role: str, insts: list, key: str, room=None):
        cands = [i for i in insts if room is None or room(i)]
        if not cands:
            return None
        if self.policy == "round-robin":
            k = self.rr[role]
            self.rr[role] += 1
            return cands[k % len(cands)]
        return min(cands, key=lambda i: (self._cost(i, key), i.name))

    def plan(self, req: ReqState) -> dict[EncoderSim, list[int]] | None:
        """Choose prefill, decode and encoders for ``req`` and charge them; ``None`` when no
        decode has room (the gateway answers 429)."""
        sim, spec = self.sim, req.spec
        total = spec.prompt_tokens + spec.max_tokens

        def room(d: DecodeSim) -> bool:
            free = self.view.get(d.name, {}).get("free_blocks", d.num_blocks)
            return free - self.inflight_blocks[d.name] >= d.blocks_for(total)

        prefill = self._pick("prefill", sim.prefills, "queued_tokens")
        decode = self._pick("decode", sim.decodes, "running", room)
        if decode is None:
            return None
        req.prefill, req.decode = prefill, decode
        blocks = decode.blocks_for(total)
        self._charge(req, prefill.name, float(spec.prompt_tokens), 0, "prefill")
        self._charge(req, decode.name, 1.0, blocks, "decode")
        assign: dict[EncoderSim, list[int]] = defaultdict(list)
        if prefill.coupled:
            req.route = "encode" if spec.images else "text"
            return assign
        cached = [i for i, im in enumerate(spec.images) if im.key in sim.cache]
        for i in cached:
            assign[sim.cache[spec.images[i].key]].append(i)
        for i in range(len(spec.images)):
            if i in cached:
                continue
            enc = self._pick("encoder", sim.encoders, "queued_patches")
            assign[enc].append(i)
            self._charge(req, enc.name, float(spec.images[i].patches), 0, "encoder")
        if not spec.images:
            req.route = "text"
        elif len(cached) == len(spec.images):
            req.route = "cached"
        else:
            req.route = "encode" if not cached else "mixed"
        return assign

    def _charge(self, req: ReqState, name: str, cost: float, blocks: int, stage: str) -> None:
        self.inflight[name] += cost
        self.inflight_blocks[name] += blocks
        req.charges.append([stage, name, cost, blocks])

    def release(self, req: ReqState, stages: tuple[str, ...]) -> None:
        for ch in req.charges:
            if ch[0] in stages and ch[2]:
                self.inflight[ch[1]] = max(0.0, self.inflight[ch[1]] - ch[2])
                ch[2] = 0.0

    def release_blocks(self, req: ReqState) -> None:
        for ch in req.charges:
            if ch[3]:
                self.inflight_blocks[ch[1]] = max(0, self.inflight_blocks[ch[1]] - ch[3])
                ch[3] = 0
