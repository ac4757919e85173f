"""Prometheus metrics of the gateway (``GET /metrics``, names prefixed ``epd_``).

Latencies follow the field's definitions (vLLM ``bench serve``): TTFT from the HTTP request's
arrival to its first token; ITL every gap between consecutive token batches; TPOT a request's
mean gap after the first token; end-to-end arrival to last token.

Transfer bytes are *derived* at the gateway, not measured: feature bytes are the cache
entry's ``nbytes`` (cached route) or ``num_tokens × hidden × dtype size`` (encode route);
KV bytes are the prompt's whole blocks × block size × per-token KV size from config.json
(``layers × 2 × kv_heads × head_dim × dtype size``). Transfer *seconds* are the stages' to
report (they do the transfers); the gateway has no honest number for them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
                     0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _InstanceCollector:
    """Per-instance load from the gateway's registry view, read at scrape time."""

    def __init__(self, router) -> None:
        self.router = router

    def describe(self):
        return []

    def collect(self):
        load = GaugeMetricFamily("epd_instance_load", "Load an instance published in the registry "
                                 "(encoder queued_images/queued_patches, prefill queued_tokens, decode "
                                 "running/free_blocks)", labels=["instance", "role", "key"])
        charged = GaugeMetricFamily("epd_instance_inflight_cost", "Cost this gateway charged to an instance "
                                    "and has not released yet", labels=["instance"])
        restarts = GaugeMetricFamily("epd_instance_restarts", "Times the supervisor restarted an instance "
                                     "(EPD_RESTARTS, from the registry)", labels=["instance", "role"])
        for role, infos in self.router.instances.items():
            for info in infos:
                restarts.add_metric([info.instance_id, role], float(info.restarts))
                for key, value in info.load.items():
                    load.add_metric([info.instance_id, role, key], float(value))
        for instance, cost in self.router.charged().items():
            charged.add_metric([instance], cost)
        yield load
        yield charged
        yield restarts


class _ElasticCollector:
    """``epd up``'s elastic controller (:mod:`epd.elastic`), from the state it publishes in the
    registry (read on each registry refresh); nothing when no controller runs."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        state = self.metrics.elastic
        if state is None:
            return
        actions = CounterMetricFamily("epd_elastic_actions", "Elastic controller actions: scale_up, scale_down, "
                                      "switch, failed, refused (bounds or guards)", labels=["action", "role"])
        for key, n in sorted(state.actions.items()):
            action, _, role = key.partition(":")
            actions.add_metric([action, role], float(n))
        yield actions
        last = GaugeMetricFamily("epd_role_switch_last_seconds", "Phases of the last role switch: offload "
                                 "(drain), migrate (weights + region), onload (registered), total", labels=["phase"])
        for phase, seconds in sorted(state.last_switch.items()):
            last.add_metric([phase], seconds)
        yield last
        total = CounterMetricFamily("epd_role_switch_seconds", "Role switches and their summed duration")
        total.add_metric([], state.switch_seconds_sum)
        yield total
        switches = CounterMetricFamily("epd_role_switches", "Role switches completed")
        switches.add_metric([], float(state.switches))
        yield switches
        targets = GaugeMetricFamily("epd_elastic_target_instances", "Instances per role the elastic controller "
                                    "steers to", labels=["role"])
        for role, n in sorted(state.targets.items()):
            targets.add_metric([role], float(n))
        yield targets


class GatewayMetrics:
    """Every gateway metric, in a registry of its own (several gateways per test process)."""

    def __init__(self, router) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("epd_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("epd_tpot_seconds", "Time per output token after the first (per request)",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("epd_itl_seconds", "Inter-token latency", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("epd_e2e_latency_seconds", "Request arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.ingress = Histogram("epd_gateway_ingress_seconds", "Gateway time from the HTTP handler's start to "
                                 "the PrefillRequest handed to ZeroMQ", buckets=_OVERHEAD_BUCKETS, registry=r)
        self.egress = Histogram("epd_gateway_egress_seconds", "Gateway time from a TokenDelta read off the "
                                "socket to its SSE chunk written", buckets=_OVERHEAD_BUCKETS, registry=r)
        self.requests = Counter("epd_requests", "Requests admitted, by route", ["route"], registry=r)
        self.finished = Counter("epd_requests_finished", "Requests ended, by finish reason "
                                "(stop, length, abort, error)", ["finish_reason"], registry=r)
        self.errors = Counter("epd_request_errors", "Error responses, by HTTP status", ["status"], registry=r)
        self.instance_requests = Counter("epd_instance_requests", "Requests (or encoder image batches) sent "
                                         "to an instance", ["instance", "role"], registry=r)
        self.images_encoded = Counter("epd_images_encoded", "Images sent to an encoder", registry=r)
        self.cache_hits = Counter("epd_feature_cache_hits", "Images whose features were live in the cache",
                                  registry=r)
        self.cache_misses = Counter("epd_feature_cache_misses", "Images that had to be encoded", registry=r)
        self.transfer_bytes = Counter("epd_transfer_bytes", "Bytes moved one-sided between stages, derived at "
                                      "the gateway (kind: feature, kv)", ["kind"], registry=r)
        self.prompt_tokens = Counter("epd_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("epd_generation_tokens", "Tokens generated", registry=r)
        self.recoveries = Counter("epd_request_recoveries", "Attempts replaced after a stage failed: retry "
                                  "(before the first token) or migration (after it)", ["kind"], registry=r)
        self.rejected = Counter("epd_messages_rejected", "Control messages the gateway dropped: no or a bad MAC, "
                                "or not from a stage of the request they name", registry=r)
        self.peer_deaths = Counter("epd_peer_deaths", "Instances the gateway's registry watch found gone "
                                   "(heartbeat expired or restarted under a new incarnation)", ["instance"],
                                   registry=r)
        r.register(_InstanceCollector(router))
        self.elastic = None  # epd.registry.controller_state.ControllerState, set by the registry refresh
        r.register(_ElasticCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)
