"""A profile's deployment-probe figures applied to it, and several profiles merged into one.

:func:`apply_probe` turns the runs :mod:`epd.plan.frontend` stored in a profile
(``device.front_end``) into what the simulator reads: the decode costs' level between the
engine's samples and the served steps (``device.decode_level``), the services' overheads against
the profile's fitted costs (``host.service``) and the encoder's factor beside the decode measured
on the served loops (``device.slowdown``). ``epd profile`` calls it after fitting, ``--refit``
after fitting again, and :func:`merge` after merging.

:func:`merge` (``epd profile --merge A.json B.json … --out M.json``) is for a host whose speed
wanders over minutes. On one 2-vCPU VM the same served one-image encode took 122.6, 134.6 and
146.0 ms in three profiles taken within 25 minutes, while the engine's own 448² sample stayed at
121.7–125.5 ms. A profile is one ~100-second draw of that state, and the simulator's error
against a 17-minute sweep followed the draw (TTFT p50 10 % to 51 % on one sweep). Merging takes,
for every measurement the profiles share, the median over them, the way ``plan_validate.py
--repeats`` combines sweeps.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

from epd.plan.profile import CostModel, Profile, ProfileError


def apply_probe(prof: Profile) -> Profile:
    """``prof`` with its decode costs set between its samples and the served steps
    (:func:`_decode_level`), ``host.service`` derived again from its stored deployment-probe runs
    against its fitted costs, and (when the encoder's forwards were read) the encode-by-decode factor
    taken from them. The decode-by-encode gap the deployment showed is recorded under
    ``device.served_slowdown`` (:func:`epd.plan.frontend.decode_beside_encode`) and applied only
    as a floor under the bare pair's decode-by-encode factor: the served gap holds the pair's
    interference *and* the time-slicing with the front end, so a bare pair that lost more than
    that was disturbed (one tiny profile: ×0.63 bare against a ×0.89 gap put the simulated TPOT
    p50 64 % high; 11.5 % with the floor). A profile without probe runs is returned as it is.
    """
    from epd.cores import split_cores
    from epd.plan.frontend import decode_beside_encode, encode_beside_decode, service_overheads

    fe = prof.device.get("front_end") or {}
    runs = fe.get("runs")
    if not runs:
        return prof
    cores = int(prof.device.get("cores", 1))
    threads = prof.nearest_threads(split_cores([("encoder",), ("prefill",), ("decode",)], cores)[2])
    prof = replace(prof, host=dict(prof.host), device=dict(prof.device))
    prof = _decode_level(prof, runs, threads)
    prof.host["service"] = service_overheads(prof, runs, threads)
    slow = prof.device.get("slowdown")
    if "beside" in runs and slow:
        gap = decode_beside_encode(runs)
        prof.device["served_slowdown"] = {"decode by encode": gap}
        source = {"others": "bare processes, duty-cycled pairs"}
        slow = {victim: dict(row) for victim, row in slow.items()}
        floor = (prof.device.get("slowdown_source") or {}).get("decode by encode")  # kept when re-applied
        if (bare := slow.get("decode", {}).get("encode", 1.0)) < gap:
            slow["decode"]["encode"] = gap  # the bare pair lost more than the whole served gap
            floor = f"epd up probe's gap (the bare pair read ×{bare:.2f})"
        elif bare > gap:
            floor = None
        if floor:
            source = {"decode by encode": floor, **source}
        if (enc := encode_beside_decode(runs)) is not None:
            slow["encode"]["decode"] = enc
            source = {"encode by decode": "epd up probe (the encoder's logged forwards)", **source}
        prof.device["slowdown"] = slow
        prof.device["slowdown_source"] = source
    return prof


def _decode_level(prof: Profile, runs: dict, threads: int) -> Profile:
    """``prof`` with every decode cost model (fitted again from its samples, so that applying this
    twice changes nothing) scaled by √r, r the geometric mean over the probe's ``text_serial``
    (batch 1) and ``text_many`` (batch ``TEXT_MANY[2]``) runs of the step the served decode timed
    (``decode_step_ms``) ÷ the fitted step at the same batch and context (``threads``: the decode
    process's). The engine's samples and the served steps are two draws of a speed that wanders
    from one minute to the next (a one-request step's 10-second medians: 0.81–1.71 × its 5-minute
    median on one VM); √r is their geometric mean. Recorded as ``device.decode_level``. A profile
    without the served steps, or without samples, is returned as it is."""
    from epd.plan.frontend import decode_points

    models = prof.stages["decode"]
    if not all(m.samples for m in models.values()):
        return prof
    fresh = {t: CostModel.fitted("decode", m.samples) for t, m in models.items()}
    logs = [math.log(run["decode_step_ms"] / 1e3 / fresh[threads](x))
            for _, run, x in decode_points(prof, runs) if run.get("decode_step_ms")]
    if not logs:
        return prof
    r = math.exp(sum(logs) / len(logs))
    scaled = {t: CostModel({k: v * math.sqrt(r) for k, v in m.coef.items()}, m.median_rel_err, m.samples)
              for t, m in fresh.items()}
    prof.device["decode_level"] = {"served_over_fit": r, "applied": math.sqrt(r)}
    return replace(prof, stages={**prof.stages, "decode": scaled})


def _median_samples(models: list[CostModel], stage: str) -> CostModel:
    """One model fitted to the median time of each sample (matched by ``what`` and features)."""
    groups: dict[tuple, list[dict]] = {}
    for m in models:
        for s in m.samples:
            groups.setdefault((s.get("what"), tuple(sorted(s["x"].items()))), []).append(s)
    samples = [{**same[0], "s": statistics.median(s["s"] for s in same), "n_profiles": len(same)}
               for same in groups.values()]
    return CostModel.fitted(stage, samples)


SERVED_KEYS = ("encode_forward_ms", "decode_step_ms")  # the services' own logged times in a probe run


def _median_runs(all_runs: list[dict]) -> dict:
    """The probe's workloads as :func:`apply_probe` reads them: each latency median
    (``*_median_s``, :data:`SERVED_KEYS`) the median over the profiles that have it, and, for a
    workload that counts its requests, the output tokens and JPEG bytes per request (the
    profiles' totals depend on how many times their version ran each workload, so they are not
    merged) with ``requests`` 1."""
    out: dict = {}
    for name in all_runs[0]:
        have = [r[name] for r in all_runs if name in r]
        counted = [h for h in have if h.get("requests")]
        merged: dict = {"requests": 1} if counted else {}
        for key in ("tokens", "mbytes") if counted else ():
            merged[key] = statistics.median([h.get(key, 0.0) / h["requests"] for h in counted])
        for key in {k for h in have for k in h if k.endswith("_median_s") or k in SERVED_KEYS}:
            vals = [h[key] for h in have if isinstance(h.get(key), (int, float))]
            if vals:
                merged[key] = statistics.median(vals)
        out[name] = merged
    return out


def merge(profiles: list[Profile]) -> Profile:
    """One profile from ``profiles`` of one model on one device (see the module docstring).

    Each engine sample is the median of its times, and every cost model is fitted again. Each
    deployment-probe latency is the median over the profiles, and :func:`apply_probe` derives the
    services' overheads and the served encode/decode factors from those. Each point of the
    capacity curve and each bare pairwise factor is the median too. So are the host costs (the
    gateway's and the client's key by key) and the transfer samples.

    Raises:
        ProfileError: fewer than two profiles, or profiles of different models, devices,
            dtypes, thread counts or transfer backends (the message names the two that differ),
            or a scaled profile (no samples to merge).
    """
    if len(profiles) < 2:
        raise ProfileError("--merge needs at least two profiles")
    first = profiles[0]

    def key(p: Profile) -> tuple:
        return (p.model.get("name"), p.model.get("num_layers"), p.device.get("name"), p.device.get("cores"),
                p.dtype, tuple(p.threads), p.transfer_backend)

    for p in profiles[1:]:
        if key(p) != key(first):
            raise ProfileError(f"cannot merge {p.path or 'a profile'} {key(p)} with {first.path or 'another'} "
                               f"{key(first)}: model, device, dtype, threads and transfer backend must match")
    if any(p.scale for p in profiles):
        raise ProfileError("cannot merge a scaled profile (it keeps no samples)")
    stages = {s: {t: _median_samples([p.stages[s][t] for p in profiles], s) for t in first.threads}
              for s in first.stages}
    transfer = _median_samples([p.transfer for p in profiles], "transfer")
    host: dict = {}
    for k, v in first.host.items():  # numbers, and the parts (gateway, client, service) key by key
        if isinstance(v, (int, float)):
            host[k] = statistics.median(p.host.get(k, v) for p in profiles)
        elif isinstance(v, dict):
            parts = [p.host[k] for p in profiles if isinstance(p.host.get(k), dict)]
            host[k] = {kk: statistics.median(part.get(kk, vv) for part in parts) for kk, vv in v.items()}
    device = {k: v for k, v in first.device.items() if not isinstance(v, (dict, list))}
    caps = [p.device.get("parallel_capacity") or {} for p in profiles]
    if all(caps):
        device["parallel_capacity"] = {k: statistics.median(c[k] for c in caps if k in c) for k in caps[0]}
        cores = int(first.device.get("cores", 1))
        device["parallel_efficiency"] = min(1.0, device["parallel_capacity"].get(str(cores), cores) / cores)
    colo = [p.device["process_colocation_efficiency"] for p in profiles if "process_colocation_efficiency" in p.device]
    if colo:
        device["process_colocation_efficiency"] = statistics.median(colo)
    slows = [p.device.get("slowdown") for p in profiles if p.device.get("slowdown")]
    if slows:
        device["slowdown"] = {v: {o: statistics.median(s[v][o] for s in slows if o in s.get(v, {}))
                                  for o in slows[0][v]} for v in slows[0]}
    fes = [p.device["front_end"] for p in profiles if p.device.get("front_end", {}).get("runs")]
    if fes:
        device["front_end"] = {"runs": _median_runs([f["runs"] for f in fes]),
                               "gateway_idle_cpu": statistics.median(f.get("gateway_idle_cpu", 0.0) for f in fes)}
    device["merged_from"] = [{"path": p.path, "created": p.created} for p in profiles]
    merged = replace(first, stages=stages, transfer=transfer, host=host, device=device,
                     created=max(p.created for p in profiles), path="")
    return apply_probe(merged)
