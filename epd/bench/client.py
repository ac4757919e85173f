"""The load generator of ``epd bench serve``: seeded arrivals, streaming OpenAI chat requests,
per-request timestamps.

Arrivals follow ``vllm bench serve``: the gap before each request is drawn from a gamma
distribution with shape ``burstiness`` and mean ``1 / request_rate`` (burstiness 1 = Poisson;
< 1 burstier, > 1 more regular); ``request_rate = inf`` sends everything at once. Requests are
dispatched at their scheduled time on one asyncio loop; ``max_concurrency`` caps the requests in
flight (later ones wait for a slot, and the wait counts in their TTFT, as in vLLM). Each request
streams (``stream: true`` with ``stream_options.include_usage``), so TTFT and every inter-token
gap are seen as the client sees them.

Ctrl-C (SIGINT) stops dispatching, cancels what is in flight and returns what was measured; a
second Ctrl-C aborts at once.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from epd.bench.metrics import RequestRecord
from epd.bench.workloads import BenchRequest


class EndpointError(RuntimeError):
    """The endpoint cannot be benchmarked: unreachable, or it does not serve the model."""


@dataclass
class RunConfig:
    """How to drive the endpoint.

    Attributes:
        base_url: e.g. ``http://127.0.0.1:8000`` (``/v1/chat/completions`` is appended).
        model: the ``model`` field of each request.
        request_rate: mean requests/s of the arrival process; ``math.inf`` = all at once.
        burstiness: gamma shape of inter-arrival gaps (1.0 = Poisson).
        max_concurrency: requests in flight at most (``None``: unbounded).
        seed: seeds the arrival gaps.
        ignore_eos: make every request generate ``max_tokens``.
        ignore_eos_via: how: ``"ignore_eos"`` (vLLM's, SGLang's and our field) or
            ``"generation_config"`` (``transformers serve``: ``{"min_new_tokens": max_tokens}``).
        temperature: sampling temperature (0 = greedy, as ``vllm bench serve``).
        timeout_s: per-request limit (s); a request past it counts as a failure (status 0).
        extra_body: merged into every request body.
        progress: show a tqdm progress bar.
    """

    base_url: str
    model: str
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = False
    ignore_eos_via: str = "ignore_eos"
    temperature: float = 0.0
    timeout_s: float = 600.0
    extra_body: dict = field(default_factory=dict)
    progress: bool = True


@dataclass
class RunResult:
    """Records of the measured requests and the wall time they took.

    Attributes:
        records: one per request that finished (success or failure), in dispatch order.
        duration_s: first dispatch → last completion (s).
        interrupted: Ctrl-C stopped the run; ``unfinished`` requests were cancelled or never sent.
        dispatch_lag_s: per request, actual send time − scheduled arrival time (s): the load
            generator's own delay (includes waiting for a ``max_concurrency`` slot).
    """

    records: list[RequestRecord]
    duration_s: float
    interrupted: bool = False
    unfinished: int = 0
    dispatch_lag_s: list[float] = field(default_factory=list)


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Scheduled send offsets (s from the start) of ``n`` requests; all zeros for ``rate = inf``.

    Raises:
        ValueError: ``rate <= 0`` or ``burstiness <= 0``.
    """
    if not rate > 0:
        raise ValueError(f"--request-rate must be > 0 or inf (got {rate})")
    if not burstiness > 0:
        raise ValueError(f"--burstiness must be > 0 (got {burstiness})")
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps)


def chat_body(req: BenchRequest, cfg: RunConfig) -> dict:
    """The OpenAI chat-completions body for ``req`` (images first, then the text)."""
    content = [{"type": "image_url", "image_url": {"url": url}} for url in req.images]
    content.append({"type": "text", "text": req.prompt})
    body = {
        "model": cfg.model, "messages": [{"role": "user", "content": content}],
        "max_completion_tokens": req.max_tokens, "max_tokens": req.max_tokens,
        "temperature": cfg.temperature, "stream": True, "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos and cfg.ignore_eos_via == "generation_config":  # transformers serve's way (422 on ignore_eos)
        body["generation_config"] = json.dumps({"min_new_tokens": req.max_tokens})
    elif cfg.ignore_eos:
        body["ignore_eos"] = True
    return body | cfg.extra_body


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw)["error"]
        return str(err.get("message", err) if isinstance(err, dict) else err)[:200]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


async def send_chat(session: aiohttp.ClientSession, url: str, body: dict, prompt_len: int) -> RequestRecord:
    """POST one streaming chat request and time it (see :class:`RequestRecord`); never raises
    for server or network errors — they become a failed record."""
    rec = RequestRecord(prompt_len=prompt_len)
    chunks = 0
    text: list[str] = []
    rec.sent_at = last = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            rec.status = resp.status
            rec.route = resp.headers.get("x-epd-route", "")
            if resp.status != 200:
                rec.error = _error_message(await resp.read())
                rec.latency = time.perf_counter() - rec.sent_at
                return rec
            done = finished = False
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                obj = json.loads(payload)
                if "error" in obj:
                    rec.error = "midstream: " + _error_message(payload)
                    break
                if obj.get("usage"):
                    rec.output_tokens = int(obj["usage"].get("completion_tokens") or 0)
                for choice in obj.get("choices") or ():
                    finished = finished or bool(choice.get("finish_reason"))
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if chunks == 0:
                            rec.ttft = now - rec.sent_at
                        else:
                            rec.itl.append(now - last)
                        last = now
                        chunks += 1
                        text.append(piece)
            rec.latency = time.perf_counter() - rec.sent_at
            rec.generated_text = "".join(text)
            if not rec.output_tokens:
                rec.output_tokens = chunks
            if not rec.error and not (done or finished):  # transformers serve ends on finish_reason, no [DONE]
                rec.error = "midstream: the stream ended without [DONE] or a finish_reason"
            rec.success = not rec.error and chunks > 0
            if not rec.success and not rec.error:
                rec.error = "no content in the response"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        rec.latency = time.perf_counter() - rec.sent_at
        rec.error = f"{type(exc).__name__}: {exc}"[:200]
        if rec.status == 200:  # the headers came, then the stream broke (or timed out)
            rec.error = "midstream: " + rec.error
    return rec


def make_session(timeout_s: float) -> aiohttp.ClientSession:
    """A client session with no connection cap (``max_concurrency`` is ours to enforce)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=timeout_s), read_bufsize=1 << 20,
    )


async def served_models(base_url: str, timeout_s: float = 10.0) -> list[str]:
    """The ids ``GET {base_url}/v1/models`` lists.

    Raises:
        EndpointError: nothing answers at ``base_url``, or the answer is not a model list.
    """
    try:
        async with make_session(timeout_s) as s, s.get(f"{base_url}/v1/models") as resp:
            if resp.status != 200:
                raise EndpointError(f"{base_url}/v1/models answered HTTP {resp.status}")
            data = await resp.json(content_type=None)
            return [m["id"] for m in data["data"]]
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise EndpointError(f"cannot reach {base_url} ({type(exc).__name__}: {exc})") from None
    except (ValueError, KeyError, TypeError):
        raise EndpointError(f"{base_url}/v1/models did not return an OpenAI model list") from None


async def run_requests(cfg: RunConfig, requests: list[BenchRequest], desc: str = "requests") -> RunResult:
    """Send ``requests`` on the arrival schedule of ``cfg`` and collect their records.

    Returns:
        The records of every finished request (failures included); on Ctrl-C, those that
        finished before it, with ``interrupted`` set.
    """
    url = cfg.base_url.rstrip("/") + "/v1/chat/completions"
    bodies = [chat_body(r, cfg) for r in requests]
    offsets = arrival_times(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    records: list[RequestRecord | None] = [None] * len(requests)
    lags: list[float] = []
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=desc, unit="req", dynamic_ncols=True)

    async def one(i: int, session: aiohttp.ClientSession, due: float) -> None:
        if sem is not None:
            async with sem:
                lags.append(time.perf_counter() - due)
                records[i] = await send_chat(session, url, bodies[i], requests[i].prompt_len)
        else:
            lags.append(time.perf_counter() - due)
            records[i] = await send_chat(session, url, bodies[i], requests[i].prompt_len)
        if bar is not None:
            bar.update(1)

    interrupted = False
    try:
        loop.add_signal_handler(signal.SIGINT, _on_sigint, loop, stop)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
        installed = False
    tasks: list[asyncio.Task] = []
    async with make_session(cfg.timeout_s) as session:
        start = time.perf_counter()
        try:
            for i, off in enumerate(offsets):
                due = start + float(off)
                delay = due - time.perf_counter()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                if stop.is_set():
                    break
                tasks.append(asyncio.create_task(one(i, session, due)))
            if tasks and not stop.is_set():
                waiter = asyncio.create_task(stop.wait())
                gathered = asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.wait({waiter, gathered}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            if stop.is_set():
                interrupted = True
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if installed:
                loop.remove_signal_handler(signal.SIGINT)
            if bar is not None:
                bar.close()
        done = [r for r in records if r is not None]
        end = max((r.sent_at + r.latency for r in done), default=start)
    return RunResult(done, max(end - start, 1e-9), interrupted, len(requests) - len(done), lags)


def _on_sigint(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """First Ctrl-C: stop and keep what was measured; a second one restores the default (abort)."""
    stop.set()
    loop.remove_signal_handler(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
