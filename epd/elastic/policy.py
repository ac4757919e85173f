"""The elastic controller's decisions (:mod:`epd.elastic`): registry readings in, actions out;
no I/O, time passed in."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from epd.registry.registry import InstanceInfo

logger = logging.getLogger(__name__)


REFUSAL_REPEAT_S = 60.0  # a refusal the load keeps asking for is reported again after this long


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
        self._last_encoders: int | None = None  # serving encoders at the previous reading
        self._last_switch = float("-inf")
        self._refused: dict[str, float] = {}  # refusal kind -> when it was last reported

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
        changed = self._last_encoders is not None and self._last_encoders != len(snap.encoders)
        self._last_encoders = len(snap.encoders)
        if snap.encoder_queue or changed:  # work, or a new/removed encoder: the idle clock starts again
            self._idle_since = None if snap.encoder_queue else snap.at
        elif self._idle_since is None:
            self._idle_since = snap.at
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
        for kind, message in refused:  # at most once per REFUSAL_REPEAT_S per kind, not every period
            if snap.at - self._refused.get(kind, float("-inf")) >= REFUSAL_REPEAT_S:
                self._refused[kind] = snap.at
                acts.append(Action("refused", "encoder" if kind == "encoder" else "switch", reason=message))
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
