"""Figures of a benchmark run, named and computed as ``vllm bench serve`` does, plus SLO attainment
and the EPD paper's goodput.

Definitions (times in ms in the output, seconds in :class:`RequestRecord`):

- **TTFT**: request sent → first content token received.
- **TPOT** (per request): ``(E2E − TTFT) / (output_tokens − 1)``, the first token excluded;
  undefined (left out) for requests with fewer than 2 output tokens.
- **ITL**: every gap between two consecutive content chunks, pooled over requests.
- **E2E latency** (``e2el``): request sent → last byte of the response.
- **SLO attainment**: the fraction of *all* measured requests (failed ones count as misses) that
  meet **both** the TTFT and the TPOT SLO (EPD Disaggregation, Singh et al. 2025, §5.1); a
  request without a TPOT (< 2 tokens) meets the TPOT SLO trivially.
- **request_goodput** (vLLM): requests meeting every given SLO ÷ duration (req/s).
- **goodput** (the paper's, over a sweep): the highest request rate with attainment ≥ 90 %,
  linearly interpolated between the last rate that meets it and the first that does not
  (:func:`goodput_from_sweep`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What the client saw of one request (times in seconds, ``perf_counter`` clock).

    Attributes:
        success: a complete 200 response with at least one token.
        status: HTTP status; 0 = no HTTP answer (connection refused/reset, client timeout).
        error: short reason when not ``success``.
        sent_at: when the request was sent (s).
        ttft: sent → first content token (s); 0.0 when none came.
        itl: gaps between consecutive content chunks after the first (s).
        latency: sent → end of response (s).
        output_tokens: ``usage.completion_tokens`` when the server reports it, else content chunks.
        prompt_len: the workload's text length of the prompt (tokens).
        route: the ``x-epd-route`` response header (``""`` for servers that do not send it).
        generated_text: the concatenated content.
    """

    success: bool = False
    status: int = 0
    error: str = ""
    sent_at: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    prompt_len: int = 0
    route: str = ""
    generated_text: str = ""

    @property
    def tpot(self) -> float | None:
        """``(latency − ttft) / (output_tokens − 1)`` in seconds; ``None`` below 2 tokens."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def error_key(rec: RequestRecord) -> str:
    """How a failed request is counted in ``errors``: its HTTP status (``"503"``), ``"midstream"``
    (200 headers, then an error event or a cut stream) or ``"connection"`` (no HTTP answer)."""
    if rec.status == 0:
        return "connection"
    return "midstream" if rec.status == 200 else str(rec.status)


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """``["ttft:2000", "tpot:50"]`` → ``{"ttft": 2000.0, "tpot": 50.0}`` (ms).

    Raises:
        ValueError: a key other than ttft/tpot/e2el, or a value that is not a positive number.
    """
    out: dict[str, float] = {}
    for spec in specs or []:
        key, sep, value = spec.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput {spec!r}: expected KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {spec!r}: {value!r} is not a number of ms") from None
        if ms <= 0:
            raise ValueError(f"--goodput {spec!r}: the SLO must be > 0 ms")
        out[key] = ms
    return out


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    """Whether ``rec`` succeeded and meets every SLO in ``slo`` (ms); TPOT is met below 2 tokens."""
    if not rec.success:
        return False
    if "ttft" in slo and rec.ttft * 1e3 > slo["ttft"]:
        return False
    if "tpot" in slo and rec.tpot is not None and rec.tpot * 1e3 > slo["tpot"]:
        return False
    return not ("e2el" in slo and rec.latency * 1e3 > slo["e2el"])


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    """``mean_/median_/std_/p{q}_{name}_ms`` of ``values_s`` (seconds); zeros when empty (as vLLM)."""
    arr = np.asarray(values_s, dtype=np.float64) * 1e3 if values_s else np.zeros(1)
    out = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
           f"std_{name}_ms": float(arr.std())}
    for q in percentiles:
        out[f"p{q:g}_{name}_ms"] = float(np.percentile(arr, q))
    return out


def compute_metrics(records: list[RequestRecord], duration_s: float, slo: dict[str, float] | None = None,
                    percentiles: tuple[float, ...] = (90.0, 99.0)) -> dict:
    """The result figures of one run.

    Args:
        records: one per measured request (warm-ups excluded), failed ones included.
        duration_s: first request sent → last response ended (s), > 0.
        slo: ``{"ttft": ms, "tpot": ms, "e2el": ms}`` (any subset); adds ``request_goodput`` and
            ``slo_attainment``.
        percentiles: extra percentiles reported as ``p{q}_{metric}_ms`` (median is always there).

    Returns:
        A dict with vLLM's keys (``completed``, ``failed``, ``total_input_tokens``,
        ``total_output_tokens``, ``request_throughput``, ``output_throughput``,
        ``total_token_throughput``, ``mean_ttft_ms``, ``median_ttft_ms``, ``std_ttft_ms``,
        ``p99_ttft_ms``, … for ttft/tpot/itl/e2el) plus ``request_goodput``, ``slo_attainment``,
        ``requests_by_route`` (count per ``x-epd-route``), ``median_ttft_ms_by_route`` and
        ``errors_by_status`` (count per
        :func:`error_key`).
    """
    ok = [r for r in records if r.success]
    duration_s = max(duration_s, 1e-9)
    total_out = sum(r.output_tokens for r in ok)
    total_in = sum(r.prompt_len for r in ok)
    out = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    out |= _stats("ttft", [r.ttft for r in ok], list(percentiles))
    out |= _stats("tpot", [r.tpot for r in ok if r.tpot is not None], list(percentiles))
    out |= _stats("itl", [g for r in ok for g in r.itl], list(percentiles))
    out |= _stats("e2el", [r.latency for r in ok], list(percentiles))
    if slo:
        good = sum(meets_slo(r, slo) for r in records)
        out["request_goodput"] = good / duration_s
        out["slo_attainment"] = good / len(records) if records else 0.0
        out["goodput_slo_ms"] = dict(slo)
    out["requests_by_route"] = dict(Counter(r.route or "unknown" for r in ok))
    out["median_ttft_ms_by_route"] = {
        route: float(np.median([r.ttft for r in ok if (r.route or "unknown") == route]) * 1e3)
        for route in out["requests_by_route"]
    }
    out["errors_by_status"] = dict(sorted(Counter(error_key(r) for r in records if not r.success).items()))
    return out


def goodput_from_sweep(points: list[tuple[float, float]], target: float = 0.9) -> tuple[float | None, str]:
    """The paper's goodput from ``(request rate, SLO attainment)`` points.

    Scans rates in increasing order and stops at the first rate whose attainment is below
    ``target``; goodput is linearly interpolated between it and the rate before, where the
    attainment line crosses ``target``.

    Returns:
        ``(goodput req/s, how)``: ``how`` is ``"interpolated"``; ``"lower-bound"`` when every
        rate meets the target (goodput ≥ the highest rate, which is returned); or
        ``"below-range"`` with ``None`` when even the lowest rate misses it.

    Raises:
        ValueError: no points, or a rate that is not finite and > 0.
    """
    if not points:
        raise ValueError("goodput needs at least one (rate, attainment) point")
    pts = sorted(points)
    if any(not np.isfinite(r) or r <= 0 for r, _ in pts):
        raise ValueError("goodput needs finite rates > 0 (an 'inf' rate has no place on the curve)")
    if pts[0][1] < target:
        return None, "below-range"
    for (r0, a0), (r1, a1) in zip(pts, pts[1:], strict=False):
        if a1 < target:
            return r0 + (a0 - target) / (a0 - a1) * (r1 - r0), "interpolated"
    return pts[-1][0], "lower-bound"
