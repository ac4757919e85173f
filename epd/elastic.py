"""Online elasticity for ``epd up`` (``EPD_ELASTIC=on``): encoder scaling and prefill ↔ decode
role switching, driven by the queue depths the instances publish in the registry.

Every ``EPD_ELASTIC_PERIOD_S`` the controller reads the registry (:func:`snapshot`), and
:class:`ElasticPolicy` decides, on the mean over the last ``EPD_ELASTIC_WINDOW`` readings:

- **encoder scaling** (EPD paper §3.4's elastic encode stage, the Kubernetes HPA's rule): queued
  images per encoder ≥ ``EPD_SCALE_UP_QUEUE`` → start one more encoder process, up to
  ``EPD_ENCODERS_MAX``; no image queued anywhere for ``EPD_SCALE_DOWN_IDLE_S`` → retire the
  newest encoder (SIGTERM: it drains, nothing fails), down to ``EPD_ENCODERS_MIN``. A count
  outside the bounds is brought inside them. One start at a time: the next waits until the
  new encoder has registered.
- **role switching** (EPD paper §3.4, in three steps: offload, migrate, onload;
  :meth:`epd.process_host.ProcessHost.switch_role` over admin ``SwitchRole``): decode crowded
  (running + waiting requests per decode ≥ ``EPD_SWITCH_DECODE_HIGH``) while prefill is idle
  (queued per prefill ≤ ``EPD_SWITCH_PREFILL_LOW``) → the least-loaded prefill becomes a
  decode; the mirror case (``EPD_SWITCH_PREFILL_HIGH`` / ``EPD_SWITCH_DECODE_LOW``) → a decode
  becomes a prefill. At least one instance of each role stays; ``EPD_SWITCH_COOLDOWN_S`` between
  switches. The language model is reused, so only the offload waits for work (in-flight
  requests get ``EPD_SWITCH_DRAIN_S``, then migrate through the gateway; none fails).

A decision the bounds forbid is logged once (``elastic: … stays at …``) and counted as
``refused``. Every action is logged by the supervisor and published
(:mod:`epd.registry.controller_state`) for the gateway's ``/metrics``
(``epd_elastic_actions_total``, ``epd_role_switch_seconds``). Only single-role processes the
launcher started are scaled or switched; co-located ones (``EP``) are left as they are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from epd.registry.controller_state import ControllerState, put_controller_state
from epd.registry.registry import InstanceInfo, Registry, RegistryError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ElasticPolicy:
    """Thresholds of the controller (module docstring; the ``EPD_…`` variables of the same names).

    Raises:
        ValueError: ``encoders_min`` > ``encoders_max``, a negative bound, or a low threshold
            not below its high one.
    """

    encoders_min: int = 1
    encoders_max: int = 1
    scale_up_queue: float = 4.0  # images queued per encoder
    scale_down_idle_s: float = 30.0
    switch: bool = True
    prefill_high: float = 4.0  # requests queued per prefill
    prefill_low: float = 0.5
    decode_high: float = 8.0  # running + waiting requests per decode
    decode_low: float = 2.0
    cooldown_s: float = 10.0
    window: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.encoders_min <= self.encoders_max:
            raise ValueError(f"EPD_ENCODERS_MIN={self.encoders_min} must be ≤ EPD_ENCODERS_MAX={self.encoders_max}")
        if self.prefill_low >= self.prefill_high or self.decode_low >= self.decode_high:
            raise ValueError("EPD_SWITCH_*_LOW must be below EPD_SWITCH_*_HIGH")
        if self.window < 1:
            raise ValueError("EPD_ELASTIC_WINDOW must be ≥ 1")


@dataclass(frozen=True)
class Snapshot:
    """One registry reading: serving single-role instance ids per role and summed queues.

    Attributes:
        at: ``time.monotonic()`` of the reading (seconds).
        encoders, prefills, decodes: instance ids (draining ones left out).
        encoder_queue: images queued (``queued_images``) over all encoders.
        prefill_queue: requests queued (``queued_requests``) over all prefill instances.
        decode_load: running + waiting requests (``running`` + ``queued``) over all decodes.
    """

    at: float
    encoders: tuple[str, ...] = ()
    prefills: tuple[str, ...] = ()
    decodes: tuple[str, ...] = ()
    encoder_queue: float = 0.0
    prefill_queue: float = 0.0
    decode_load: float = 0.0


def snapshot(instances: Iterable[InstanceInfo], at: float) -> Snapshot:
    """A :class:`Snapshot` of the registry's ``instances`` (only single-role, non-draining ones)."""
    ids: dict[str, list[str]] = {"encoder": [], "prefill": [], "decode": []}
    queue = {"encoder": 0.0, "prefill": 0.0, "decode": 0.0}
    keys = {"encoder": ("queued_images",), "prefill": ("queued_requests",), "decode": ("running", "queued")}
    for info in instances:
        if len(info.roles) != 1 or info.draining or info.roles[0] not in ids:
            continue
        role = info.roles[0]
        ids[role].append(info.instance_id)
        queue[role] += sum(float(info.load.get(k, 0.0)) for k in keys[role])
    return Snapshot(at, tuple(sorted(ids["encoder"])), tuple(sorted(ids["prefill"])), tuple(sorted(ids["decode"])),
                    queue["encoder"], queue["prefill"], queue["decode"])


@dataclass(frozen=True)
class Action:
    """A decision: ``kind`` ``scale_up`` | ``scale_down`` (``role`` encoder), ``switch``
    (``role`` → ``to_role``) or ``refused`` (the bounds forbid what the load asks; ``reason``)."""

    kind: str
    role: str
    to_role: str = ""
    reason: str = ""


class Policy:
    """Turns registry readings into actions (module docstring). Pure: no I/O, time passed in.

    Args:
        cfg: the thresholds.
    """

    def __init__(self, cfg: ElasticPolicy) -> None:
        self.cfg = cfg
        self.history: deque[Snapshot] = deque(maxlen=cfg.window)
        self._idle_since: float | None = None
        self._last_switch = float("-inf")
        self._refused: set[str] = set()

    def switched(self, at: float) -> None:
        """Note that a switch was made (or tried) at ``at``: the cooldown starts."""
        self._last_switch = at
        self.history.clear()  # the old readings describe the old roles

    def decide(self, snap: Snapshot, pending_encoders: int = 0) -> list[Action]:
        """Actions for this reading; ``pending_encoders``: started, not yet registered."""
        cfg, hist = self.cfg, self.history
        hist.append(snap)
        full = len(hist) == cfg.window
        acts: list[Action] = []
        refused: list[tuple[str, str]] = []  # (kind, message): a kind is logged once per episode
        n_enc = len(snap.encoders) + pending_encoders
        self._idle_since = (self._idle_since or snap.at) if snap.encoder_queue == 0 else None
        if n_enc < cfg.encoders_min and not pending_encoders:
            acts.append(Action("scale_up", "encoder", reason=f"below EPD_ENCODERS_MIN={cfg.encoders_min}"))
        elif n_enc > cfg.encoders_max:
            acts.append(Action("scale_down", "encoder", reason=f"above EPD_ENCODERS_MAX={cfg.encoders_max}"))
        elif full and (per := _mean(hist, "encoder_queue", "encoders")) >= cfg.scale_up_queue:
            if pending_encoders:
                pass  # the encoder being started is the answer; wait for it
            elif n_enc >= cfg.encoders_max:
                refused.append(("encoder", f"encoder queue {per:.1f}/instance ≥ EPD_SCALE_UP_QUEUE="
                                f"{cfg.scale_up_queue:g} but EPD_ENCODERS_MAX={cfg.encoders_max} reached: "
                                f"stays at {n_enc}"))
            else:
                acts.append(Action("scale_up", "encoder", reason=f"{per:.1f} images queued per encoder"))
        elif self._idle_since is not None and snap.at - self._idle_since >= cfg.scale_down_idle_s \
                and not pending_encoders:
            if n_enc > cfg.encoders_min:
                acts.append(Action("scale_down", "encoder", reason=f"no image queued for {cfg.scale_down_idle_s:g} s"))
                self._idle_since = snap.at
        if cfg.switch and full and snap.at - self._last_switch >= cfg.cooldown_s:
            p_per = _mean(hist, "prefill_queue", "prefills")
            d_per = _mean(hist, "decode_load", "decodes")
            if d_per >= cfg.decode_high and p_per <= cfg.prefill_low:
                why = f"{d_per:.1f} requests per decode, {p_per:.1f} queued per prefill"
                if len(snap.prefills) >= 2:
                    acts.append(Action("switch", "prefill", "decode", why))
                else:
                    refused.append(("to_decode", f"{why}: a switch to decode would leave no prefill: stays"))
            elif p_per >= cfg.prefill_high and d_per <= cfg.decode_low:
                why = f"{p_per:.1f} queued per prefill, {d_per:.1f} requests per decode"
                if len(snap.decodes) >= 2:
                    acts.append(Action("switch", "decode", "prefill", why))
                else:
                    refused.append(("to_prefill", f"{why}: a switch to prefill would leave no decode: stays"))
        kinds = {k for k, _ in refused}
        for kind, message in refused:
            if kind not in self._refused:  # once per episode, not every period
                acts.append(Action("refused", "encoder" if kind == "encoder" else "switch", reason=message))
        self._refused = kinds
        return acts


def _mean(hist: Iterable[Snapshot], total: str, members: str) -> float:
    values = [getattr(s, total) / max(1, len(getattr(s, members))) for s in hist]
    return sum(values) / max(1, len(values))


def policy_from_config(cfg, encoders: int) -> ElasticPolicy:
    """The :class:`ElasticPolicy` of an :class:`epd.config.ElasticConfig`; unset encoder bounds
    default to ``encoders`` (the topology's standalone encoder count).

    Raises:
        ConfigError: inconsistent bounds or thresholds (names the variables).
    """
    from epd.config import ConfigError

    lo = encoders if cfg.encoders_min is None else cfg.encoders_min
    hi = max(lo, encoders) if cfg.encoders_max is None else cfg.encoders_max
    try:
        return ElasticPolicy(
            encoders_min=lo, encoders_max=hi, scale_up_queue=cfg.scale_up_queue,
            scale_down_idle_s=cfg.scale_down_idle_s, switch=cfg.role_switch == "on",
            prefill_high=cfg.switch_prefill_high, prefill_low=cfg.switch_prefill_low,
            decode_high=cfg.switch_decode_high, decode_low=cfg.switch_decode_low,
            cooldown_s=cfg.switch_cooldown_s, window=cfg.elastic_window,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def process_name(instance_id: str) -> str:
    """The launcher's process name of a single-role instance (``prefill-1-as-decode`` → ``prefill-1``)."""
    return instance_id.split("-as-", 1)[0]


class ElasticController(threading.Thread):
    """The controller thread of ``epd up`` (module docstring).

    Args:
        policy: the thresholds.
        registry: the deployment's registry (signed with the cluster secret when set).
        supervisor: ``epd up``'s :class:`epd.supervisor.Supervisor` (its ``add``, ``retire``,
            ``set_spec``, ``say``, ``wait_stopping``, ``processes``).
        spec_for: ``(process name, role, instance id) -> ProcessSpec`` of a single-role process
            as the launcher starts it.
        period_s: seconds between readings (``EPD_ELASTIC_PERIOD_S``).
        switch_drain_s: offload time a switched instance gives its in-flight work (``EPD_SWITCH_DRAIN_S``).
        admin_token: the admin key (cluster secret) for ``SwitchRole``, or None.
        startup_timeout_s: a started encoder not registered after this long counts as failed.
    """

    def __init__(self, policy: ElasticPolicy, registry: Registry, supervisor, spec_for: Callable,
                 period_s: float = 2.0, switch_drain_s: float = 2.0, admin_token: bytes | None = None,
                 startup_timeout_s: float = 180.0) -> None:
        super().__init__(name="elastic", daemon=True)
        self.policy = Policy(policy)
        self.registry, self.supervisor, self.spec_for = registry, supervisor, spec_for
        self.period_s, self.switch_drain_s, self.token = period_s, switch_drain_s, admin_token
        self.startup_timeout_s = startup_timeout_s
        self.state = ControllerState(targets={})
        self.pending: dict[str, float] = {}  # encoder process started -> deadline to register
        self._next_encoder = 0

    def run(self) -> None:
        while not self.supervisor.wait_stopping(self.period_s):
            try:
                self.tick()
            except RegistryError as exc:  # Redis down: try again next period
                logger.warning("elastic: registry unreachable: %s", exc)
            except Exception:  # never take the deployment down
                logger.exception("elastic: controller step failed")

    def tick(self, now: float | None = None) -> list[Action]:
        """One reading and what it decided (also carried out and published)."""
        now = time.monotonic() if now is None else now
        instances = self.registry.instances()
        snap = snapshot(instances, now)
        registered = {process_name(i) for i in snap.encoders}
        for name, deadline in list(self.pending.items()):
            if name in registered or now > deadline:
                del self.pending[name]
                if name not in registered:
                    self.supervisor.say(f"elastic: {name} did not register in {self.startup_timeout_s:g} s")
        actions = self.policy.decide(snap, len(self.pending))
        for action in actions:
            self._act(action, snap, instances, now)
        n_enc = len(snap.encoders) + len(self.pending)
        self.state.targets = {"encoder": n_enc, "prefill": len(snap.prefills), "decode": len(snap.decodes)}
        put_controller_state(self.registry, self.state, ttl_s=max(10.0, 5 * self.period_s))
        return actions

    def _count(self, key: str) -> None:
        self.state.actions[key] = self.state.actions.get(key, 0) + 1

    def _act(self, action: Action, snap: Snapshot, instances: list[InstanceInfo], now: float) -> None:
        if action.kind == "refused":
            self._count(f"refused:{action.role}")
            self.supervisor.say(f"elastic: {action.reason}")
        elif action.kind == "scale_up":
            names = {p.name for p in self.supervisor.processes() if p.state not in ("retired", "exited")}
            while f"encoder-{self._next_encoder}" in names:
                self._next_encoder += 1
            name = f"encoder-{self._next_encoder}"
            self.supervisor.say(f"elastic: adding {name} ({action.reason}; {len(snap.encoders)} serving, "
                                f"max {self.policy.cfg.encoders_max})")
            self.supervisor.add(self.spec_for(name, "encoder", name))
            self.pending[name] = now + self.startup_timeout_s
            self._count("scale_up:encoder")
        elif action.kind == "scale_down":
            ours = {p.name for p in self.supervisor.processes()}
            victims = [i for i in snap.encoders if process_name(i) in ours]
            if not victims:
                return
            victim = max(victims, key=lambda i: (len(i), i))  # the newest: encoder-10 after encoder-9
            self.supervisor.say(f"elastic: retiring {process_name(victim)} ({action.reason}; "
                                f"min {self.policy.cfg.encoders_min})")
            self.supervisor.retire(process_name(victim))
            self._count("scale_down:encoder")
        elif action.kind == "switch":
            self._switch(action, instances, now)

    def _switch(self, action: Action, instances: list[InstanceInfo], now: float) -> None:
        from epd.admin import AdminError, switch_role

        ours = {p.name for p in self.supervisor.processes()}
        candidates = [i for i in instances if i.roles == [action.role] and not i.draining and i.admin
                      and process_name(i.instance_id) in ours]
        if not candidates:
            return
        key = {"prefill": ("queued_requests",), "decode": ("running", "queued")}[action.role]
        info = min(candidates, key=lambda i: (sum(i.load.get(k, 0.0) for k in key), i.instance_id))
        self.policy.switched(now)
        self.supervisor.say(f"elastic: switching {info.instance_id} {action.role} -> {action.to_role} "
                            f"({action.reason})")
        t0 = time.monotonic()
        try:
            reply = switch_role(info.admin, action.role, action.to_role, drain_timeout_s=self.switch_drain_s,
                                timeout_s=self.switch_drain_s + 120, token=self.token)
        except AdminError as exc:
            self.supervisor.say(f"elastic: switch of {info.instance_id} failed: {exc}")
            self._count(f"failed:{action.role}>{action.to_role}")
            return
        total = time.monotonic() - t0
        if not reply.ok:
            self.supervisor.say(f"elastic: switch of {info.instance_id} refused: {reply.message}")
            self._count(f"failed:{action.role}>{action.to_role}")
            return
        name = process_name(info.instance_id)
        self.supervisor.set_spec(name, self.spec_for(name, action.to_role, reply.instance_id))  # restarts keep it
        self.state.last_switch = {"offload": reply.offload_s, "migrate": reply.migrate_s, "onload": reply.onload_s,
                                  "total": total}
        self.state.switches += 1
        self.state.switch_seconds_sum += total
        self._count(f"switch:{action.role}>{action.to_role}")
        weights = "weights reused" if reply.weights_reused else "weights loaded"
        self.supervisor.say(
            f"elastic: {info.instance_id} is now {reply.instance_id} ({action.to_role}) after {total:.3f} s: offload "
            f"{reply.offload_s:.3f}, migrate {reply.migrate_s:.3f} ({weights}), onload {reply.onload_s:.3f}")
