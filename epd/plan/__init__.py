"""Capacity planning for epd-serve (DESIGN.md §10 "Planning"; EPD Disaggregation §3.2.3).

Three pieces, each usable alone:

- :mod:`epd.plan.profile` — the profile JSON (what ``epd profile`` writes): per-stage cost
  models fitted to measurements on one device, model and dtype, plus the host's per-request
  and per-token overheads. :mod:`epd.plan.profiler` measures it with the real engine parts.
- :mod:`epd.plan.sim` — a discrete-event simulator (SimPy) of the whole pipeline: gateway
  routing, encoder batching, feature prefetch, packed prefill, layer-grouped KV transfer,
  continuous-batching decode over a finite block pool, co-location as processor sharing,
  the feature cache. It returns what ``epd bench serve`` returns (:mod:`epd.bench.metrics`).
- :mod:`epd.plan.search` — ``epd plan``: search deployments for the best goodput (Optuna's
  TPE, the EPD paper's Bayesian optimisation; exhaustive search on small spaces).
"""
