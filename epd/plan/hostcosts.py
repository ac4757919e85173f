"""The measured host costs of a profile (``host.gateway``, ``host.client``, ``host.service``;
:mod:`epd.plan.frontend` measures them): their validation and how the simulator reads them.

- ``host.gateway`` / ``host.client``: CPU seconds of the gateway's and the benchmark client's
  loop per request, per MB of image, per delivery (one decode step's tokens reaching the loop)
  and per token;
- ``host.service``: seconds the services spend beyond the engine's forwards — per decode step
  and per request in it, per prefilled request, per encoded image.

All are optional: a profile without them simulates as before they existed (the gateway costs
the synthetic probe's ``request_s``/``request_mbyte_s``/``token_s``, the client and the
services' loops nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable

FRONT_KEYS = ("request_s", "request_mbyte_s", "delivery_s", "token_s")  # host.gateway, host.client
FRONT_ENDS = ("gateway", "client")
SERVICE_KEYS = ("decode_step_s", "decode_token_s", "prefill_request_s", "encode_image_s")  # host.service


def host_parts(host: dict, need: Callable, where: str, error: type[Exception]) -> dict[str, dict[str, float]]:
    """The optional parts of a profile's ``host`` object, checked: ``{part: {key: seconds}}``.

    Args:
        host: the raw ``host`` object.
        need: ``need(obj, key, kind, ctx)`` of :meth:`epd.plan.profile.Profile.from_json` (raises
            ``ProfileError`` naming the field when it is missing or of the wrong type).
        where: the file, for messages.
        error: the exception to raise (``ProfileError``).

    Raises:
        error: a part that is not an object, a missing key, or a value that is not a
            finite number ≥ 0 (the message names ``host.<part>.<key>``).
    """
    parts = {who: FRONT_KEYS for who in FRONT_ENDS} | {"service": SERVICE_KEYS}
    out = {}
    for part, keys in parts.items():
        if part not in host:
            continue
        obj = need(host, part, dict, "host.")
        for key in keys:
            val = need(obj, key, (int, float), f"host.{part}.")
            if not math.isfinite(val) or val < 0:
                raise error(f"{where}: field host.{part}.{key} must be a finite number ≥ 0")
        out[part] = {k: float(obj[k]) for k in keys}
    return out


def front(host: dict, who: str) -> dict[str, float]:
    """CPU seconds of ``who`` (``gateway`` | ``client``) per request, per MB of image, per
    delivery and per token: the measured ``host.<who>`` when present, else the synthetic probe's
    figures for the gateway and nothing for the client."""
    if who in host:
        return dict(host[who])
    if who == "gateway":
        return {"request_s": host["request_s"], "request_mbyte_s": host["request_mbyte_s"], "delivery_s": 0.0,
                "token_s": host["token_s"]}
    return dict.fromkeys(FRONT_KEYS, 0.0)


def overhead_s(host: dict, stage: str, n: int) -> float:
    """Seconds a service spends beyond the forward on one ``stage`` step of ``n`` items (decode:
    requests in the batch; prefill: requests; encode: images); 0 without ``host.service``."""
    d = host.get("service")
    if not d:
        return 0.0
    if stage == "decode":
        return d["decode_step_s"] + d["decode_token_s"] * n
    return {"prefill": d["prefill_request_s"], "encode": d["encode_image_s"]}.get(stage, 0.0) * n
