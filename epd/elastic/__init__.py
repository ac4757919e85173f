"""Online elasticity for ``epd up`` (``EPD_ELASTIC=on``): encoder scaling and prefill ↔ decode
role switching, driven by the queue depths the instances publish in the registry.

Every ``EPD_ELASTIC_PERIOD_S`` the controller reads the registry (:func:`snapshot`), and
:class:`ElasticPolicy` decides, on the mean over the last ``EPD_ELASTIC_WINDOW`` readings:

- **encoder scaling** (EPD paper §3.4's elastic encode stage, the Kubernetes HPA's rule): queued
  images per encoder ≥ ``EPD_SCALE_UP_QUEUE`` → start one more encoder process, up to
  ``EPD_ENCODERS_MAX``; no image queued anywhere for ``EPD_SCALE_DOWN_IDLE_S`` (counted again
  from each change in the encoder count) → retire the newest encoder (SIGTERM: it drains,
  nothing fails), down to ``EPD_ENCODERS_MIN``. A count outside the bounds is brought inside
  them. One start at a time: the next waits until the new encoder has registered.
- **role switching** (EPD paper §3.4, in three steps: offload, migrate, onload;
  :meth:`epd.process_host.ProcessHost.switch_role` over admin ``SwitchRole``): decode crowded
  (running + waiting requests per decode ≥ ``EPD_SWITCH_DECODE_HIGH``) while prefill is idle
  (queued per prefill ≤ ``EPD_SWITCH_PREFILL_LOW``) → the least-loaded prefill becomes a
  decode; the mirror case (``EPD_SWITCH_PREFILL_HIGH`` / ``EPD_SWITCH_DECODE_LOW``) → a decode
  becomes a prefill. At least one instance of each role stays; ``EPD_SWITCH_COOLDOWN_S`` between
  switches. The language model is reused, so only the offload waits for work (in-flight
  requests get ``EPD_SWITCH_DRAIN_S``, then migrate through the gateway; none fails).

A decision the bounds forbid is logged (``elastic: … stays …``, at most once a minute per
kind) and counted as ``refused``. Every action is logged by the supervisor and published
(:mod:`epd.registry.controller_state`) for the gateway's ``/metrics``
(``epd_elastic_actions_total``, ``epd_role_switch_seconds``). Only single-role processes the
launcher started are scaled or switched; co-located ones (``EP``) are left as they are.
"""

from epd.elastic.controller import ElasticController, for_up, spec_factory
from epd.elastic.policy import (
    Action,
    ElasticPolicy,
    Policy,
    Snapshot,
    policy_from_config,
    process_name,
    snapshot,
)

__all__ = ["Action", "ElasticController", "ElasticPolicy", "for_up", "Policy", "Snapshot", "policy_from_config",
           "process_name", "snapshot", "spec_factory"]
