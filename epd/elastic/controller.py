"""The elastic controller thread of ``epd up`` (:mod:`epd.elastic`): reads the registry, asks
:class:`~epd.elastic.policy.Policy`, carries out its actions with the supervisor and the admin
``SwitchRole`` call, and publishes its state for the gateway's ``/metrics``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from epd.elastic.policy import Action, ElasticPolicy, Policy, Snapshot, policy_from_config, process_name, snapshot
from epd.registry.controller_state import ControllerState, put_controller_state
from epd.registry.registry import InstanceInfo, Registry, RegistryError

logger = logging.getLogger(__name__)


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


def spec_factory(specs: list) -> Callable:
    """``spec_for(name, role, instance_id)`` for :class:`ElasticController`: a single-role process
    built like ``epd up``'s own (:func:`epd.launcher.deployment_specs`), its environment and
    thread count copied from a started process of that role (else any single-role one).

    Raises (from the returned function):
        ValueError: the deployment has no single-role backend process to copy.
    """
    from dataclasses import replace

    single = [s for s in specs if s.env and "EPD_TORCH_THREADS" in s.env and "EPD_ROLES" not in s.env]
    compute = [s for s in specs if s.env and "EPD_TORCH_THREADS" in s.env]

    def spec_for(name: str, role: str, instance_id: str):
        same = [s for s in single if f"-m services.{role}" in s.command]
        template = (same or single or compute or [None])[0]
        if template is None:
            raise ValueError("no backend process to copy the environment of")
        env = {k: v for k, v in template.env.items() if k != "EPD_ROLES"}
        env["EPD_INSTANCE_ID"] = instance_id
        python = template.command.split(" -m ", 1)[0]  # "exec <python>"
        log_file = str(Path(template.log_file).with_name(f"{name}.log")) if template.log_file else None
        return replace(template, name=name, command=f"{python} -m services.{role}", env=env, log_file=log_file)

    return spec_for


def for_up(supervisor, specs: list, redis_url: str, startup_timeout_s: float) -> Callable[[], ElasticController] | None:
    """Check the ``EPD_ELASTIC*`` configuration of an ``epd up`` deployment now and return what
    starts its controller (call it once the deployment is healthy: before that the encoder count
    is not known); None when ``EPD_ELASTIC`` is off.

    Raises:
        ConfigError: a bad ``EPD_ELASTIC*``/``EPD_ENCODERS_*``/``EPD_SWITCH_*`` variable.
    """
    from epd.config import ClusterSecretConfig, ElasticConfig, load
    from epd.wire.auth import derive_key, load_secret

    cfg = load(ElasticConfig)
    if cfg.elastic != "on":
        return None
    policy = policy_from_config(cfg, sum(1 for s in specs if "-m services.encoder" in s.command))
    sec = load(ClusterSecretConfig)
    secret = load_secret(sec.cluster_secret, sec.cluster_secret_file)

    def start() -> ElasticController:
        controller = ElasticController(
            policy, Registry(redis_url, secret=secret), supervisor, spec_factory(specs),
            period_s=cfg.elastic_period_s, switch_drain_s=cfg.switch_drain_s,
            admin_token=derive_key(secret, "admin") if secret else None, startup_timeout_s=startup_timeout_s,
        )
        supervisor.say(f"elastic: on, every {cfg.elastic_period_s:g} s: encoders {policy.encoders_min}–"
                       f"{policy.encoders_max} (queue ≥ {policy.scale_up_queue:g}/encoder adds one, "
                       f"{policy.scale_down_idle_s:g} s idle removes one); role switching "
                       f"{'on' if policy.switch else 'off'}")
        controller.start()
        return controller

    return start
