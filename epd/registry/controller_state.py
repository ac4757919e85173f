"""What ``epd up``'s elastic controller (:mod:`epd.elastic`) publishes in the registry, for the
gateway's ``/metrics``: its action counts, the last role switch's phase times and the instance
counts it is steering to. One JSON document under ``<prefix>:elastic``, signed like every
registry entry when the cluster secret is set, with a TTL of a few controller periods (a
controller that died stops being reported).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import redis

from epd.registry.registry import Registry, RegistryError

logger = logging.getLogger(__name__)


@dataclass
class ControllerState:
    """The controller's published state.

    Attributes:
        actions: count per ``"<action>:<role>"``: ``scale_up:encoder``, ``scale_down:encoder``,
            ``switch:prefill>decode``, ``switch:decode>prefill``, ``refused:<why>`` (bounds hit).
        last_switch: phase times of the last role switch, seconds: ``offload``, ``migrate``,
            ``onload``, ``total``.
        targets: instance count per role the controller is steering to.
        switch_seconds_sum, switches: for the mean switch time.
    """

    actions: dict[str, int] = field(default_factory=dict)
    last_switch: dict[str, float] = field(default_factory=dict)
    targets: dict[str, int] = field(default_factory=dict)
    switch_seconds_sum: float = 0.0
    switches: int = 0


def _key(reg: Registry) -> str:
    return f"{reg.prefix}:elastic"


def put_controller_state(reg: Registry, state: ControllerState, ttl_s: float) -> None:
    """Publish ``state`` for ``ttl_s`` seconds.

    Raises:
        RegistryError: Redis unreachable.
    """
    key = _key(reg)
    try:
        reg.r.set(key, reg._encode(key, asdict(state), ttl_s), px=int(ttl_s * 1000))
    except redis.RedisError as exc:
        raise reg._error(exc) from exc


def get_controller_state(reg: Registry) -> ControllerState | None:
    """The published state, or ``None`` when there is no live controller, or its entry is
    malformed or (with a secret) not validly signed.

    Raises:
        RegistryError: Redis unreachable.
    """
    key = _key(reg)
    try:
        raw = reg.r.get(key)
    except redis.RedisError as exc:
        raise reg._error(exc) from exc
    if not raw:
        return None
    try:
        obj = reg._decode(key, raw)
        return ControllerState(**obj) if obj is not None else None
    except (TypeError, ValueError) as exc:
        logger.warning("malformed controller state %s skipped: %s", key, exc)
        return None


__all__ = ["ControllerState", "RegistryError", "get_controller_state", "put_controller_state"]
