"""Fault-injection helpers shared by the fault tests and ``benchmarks/faults.py``: a request
running in a thread that records when each piece arrived, waits on registry state, and the
"nothing leaked" check."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from epd.registry.registry import InstanceInfo, Registry


@dataclass
class Outcome:
    """What the client saw: status, token ids in order, an error (body or SSE event), timings."""

    status: int = 0
    rid: str = ""
    token_ids: list[int] = field(default_factory=list)
    error: dict | None = None
    finish_reason: str | None = None
    t_start: float = 0.0
    t_end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    done: bool = False  # saw [DONE] (streaming) or a whole body


class ClientRequest(threading.Thread):
    """POST ``body`` to ``url`` in a thread (streaming when ``body["stream"]``).

    ``first_tokens`` is set once ``after_tokens`` token ids have arrived (streaming only).
    """

    def __init__(self, url: str, body: dict, after_tokens: int = 1, timeout: float = 120) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.after, self.timeout = url, body, after_tokens, timeout
        self.out = Outcome()
        self.first_tokens = threading.Event()
        self.start()

    def run(self) -> None:
        out = self.out
        out.t_start = time.monotonic()
        req = urllib.request.Request(self.url, data=json.dumps(self.body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                out.status = resp.status
                out.rid = resp.headers.get("x-request-id", "")
                if self.body.get("stream"):
                    self._read_stream(resp)
                else:
                    body = json.loads(resp.read())
                    out.token_ids = body["choices"][0]["token_ids"]
                    out.finish_reason = body["choices"][0]["finish_reason"]
                    out.done = True
        except urllib.error.HTTPError as err:
            out.status = err.code
            out.error = json.loads(err.read()).get("error")
        except OSError as err:  # connection reset: the gateway went away
            out.error = {"message": f"connection error: {err}", "type": "connection"}
        finally:
            out.t_end = time.monotonic()
            self.first_tokens.set()

    def _read_stream(self, resp) -> None:
        out = self.out
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                out.done = True
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                out.error = chunk["error"]
                continue
            choice = chunk["choices"][0]
            if choice.get("token_ids"):
                out.token_ids.extend(choice["token_ids"])
                out.chunk_times.append(time.monotonic())
            out.finish_reason = choice.get("finish_reason") or out.finish_reason
            if len(out.token_ids) >= self.after:
                self.first_tokens.set()

    def result(self, timeout: float = 120) -> Outcome:
        self.join(timeout)
        assert not self.is_alive(), "client request still running"
        return self.out


def results(reqs: list[ClientRequest], timeout: float, read_logs: Callable[[], dict[str, str]],
            since: str = "") -> list[Outcome]:
    """Every request's :class:`Outcome`, waiting at most ``timeout`` s in all.

    Raises:
        AssertionError: some are still running; the message names each wire request id the
            gateway admitted at or after ``since`` (a log timestamp, ``YYYY-MM-DD HH:MM:SS``) that no
            decode finished, with every line naming it of the logs ``read_logs()`` returns (service
            name → log text).
    """
    deadline = time.monotonic() + timeout
    for r in reqs:
        r.join(max(0.0, deadline - time.monotonic()))
    stuck = [i for i, r in enumerate(reqs) if r.is_alive()]
    if not stuck:
        return [r.out for r in reqs]
    logs = read_logs()
    admitted = [line.split("request ", 1)[1].split(":", 1)[0] for line in logs.get("gateway", "").splitlines()
                if ": route " in line and line[:19] >= since]
    finished = {rid for name, text in logs.items() if name.startswith("decode")
                for rid in admitted if f"request {rid} finished" in text}
    lines = [f"{name}: {line}" for rid in admitted if rid not in finished
             for name, text in logs.items() for line in text.splitlines() if rid in line]
    raise AssertionError(f"{len(stuck)} of {len(reqs)} requests still running after {timeout:g} s "
                         f"(indices {stuck}); admitted, not finished by a decode:\n" + "\n".join(lines))


def wait_for(pred, timeout: float, period: float = 0.1, what: str = "condition"):
    """Poll ``pred()`` until it returns something truthy; returns it. Raises AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(period)


def instance(reg: Registry, instance_id: str) -> InstanceInfo | None:
    return next((i for i in reg.instances() if i.instance_id == instance_id), None)


def leaks(reg: Registry) -> list[str]:
    """What the registry's published loads say is still held: empty when nothing leaked."""
    held = []
    for info in reg.instances():
        load = info.load
        role = info.roles[0]
        if role == "decode" and (load.get("free_blocks") != load.get("total_blocks") or load.get("running")
                                 or load.get("reserved") or load.get("queued")):
            held.append(f"{info.instance_id}: {load}")
        if role == "prefill" and (load.get("queued_requests") or load.get("staging_used_bytes")):
            held.append(f"{info.instance_id}: {load}")
        if role == "encoder" and load.get("queued_images"):
            held.append(f"{info.instance_id}: {load}")
    return held
