"""Deployment shapes in the papers' notation (DESIGN.md §4; EPD-Serve §3, EPD Disaggregation §3).

Grammar (whitespace ignored, letters case-insensitive)::

    topology := element ("-" element)*
    element  := [count] group | [count] "(" group ("-" group)* ")"
    group    := one or more of the letters E, P, D, each at most once (E, EP, PD, EPD, ...)

How it maps to processes here:

- ``-`` separates devices. Every element is one device; ``2E`` is two devices, each with
  its own encoder process.
- Letters written together (``EP``, ``PD``, ``EPD``) are **one process** hosting those roles
  (``EPD_ROLES``): each role keeps its own inbox, queue, loop thread and registry entry
  (logical isolation) and they share the model weights and the torch thread pool.
- ``( … )`` is EPD-Serve's "same device, separate logical instances": **one process per
  member**, all given the same device index (on GPU/NPU ``EPD_DEVICE=cuda:N``); on CPU
  that means separate processes on the machine, each with its own ``EPD_TORCH_THREADS``
  — the way to *partition* CPU threads between roles, which co-location in one process
  cannot do (torch's intra-op pool is process-global).

Examples: ``E-P-D`` (full disaggregation, 3 processes), ``EP-D`` (the PD-disaggregated
baseline: encoder and prefill in one process), ``E-PD``, ``EPD`` (monolith, 1 process),
``(E-P)-D`` (E and P as two processes on one device), ``2E-1P-1D``, ``2(E-P)-D``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLE_ORDER = ("encoder", "prefill", "decode")
LETTERS = {"E": "encoder", "P": "prefill", "D": "decode"}


def parse_roles(spec: str) -> tuple[str, ...]:
    """Roles named by ``EPD_ROLES``: ``"encoder,prefill"``, ``"E,P"``, ``"EP"``, ``"prefill"``.

    Returns:
        The distinct roles in pipeline order (encoder, prefill, decode).

    Raises:
        ValueError: empty, an unknown role or letter, or a role named twice.
    """
    roles: list[str] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token.lower() in ROLE_ORDER:
            named = [token.lower()]
        elif re.fullmatch(r"[EPDepd]+", token):
            named = [LETTERS[c] for c in token.upper()]
        else:
            raise ValueError(f"unknown role {token!r} (expected encoder, prefill, decode or the letters E, P, D)")
        for role in named:
            if role in roles:
                raise ValueError(f"role {role} named twice in {spec!r}")
            roles.append(role)
    if not roles:
        raise ValueError("no role given (expected e.g. encoder,prefill or EP)")
    return tuple(r for r in ROLE_ORDER if r in roles)


def letters(roles: tuple[str, ...]) -> str:
    """``("encoder", "prefill")`` → ``"EP"``."""
    return "".join(r[0].upper() for r in roles)


@dataclass(frozen=True)
class ProcessSpec:
    """One process of a deployment.

    Attributes:
        roles: roles it hosts, in pipeline order.
        device: index of the device it runs on; processes of one ``( … )`` group share it.
    """

    roles: tuple[str, ...]
    device: int

    @property
    def name(self) -> str:
        return letters(self.roles)


@dataclass(frozen=True)
class Topology:
    """A parsed topology: its processes in notation order."""

    notation: str
    processes: tuple[ProcessSpec, ...]

    def count(self, role: str) -> int:
        """Instances of ``role`` (a co-located process counts once for each role it hosts)."""
        return sum(role in p.roles for p in self.processes)

    @property
    def num_devices(self) -> int:
        return len({p.device for p in self.processes})


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = re.sub(r"\s+", "", text).upper()
        self.pos = 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"topology {self.text!r}: {what} at position {self.pos}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def count(self) -> int:
        m = re.match(r"\d+", self.text[self.pos:])
        if not m:
            return 1
        self.pos += m.end()
        n = int(m.group())
        if n < 1:
            raise self.error("a count must be at least 1")
        return n

    def group(self) -> tuple[str, ...]:
        m = re.match(r"[EPD]+", self.text[self.pos:])
        if not m:
            raise self.error("expected role letters E, P, D")
        self.pos += m.end()
        if len(set(m.group())) != len(m.group()):
            raise self.error(f"a role repeated in {m.group()!r} (use a count, e.g. 2E)")
        return tuple(r for r in ROLE_ORDER if r[0].upper() in m.group())

    def parse(self) -> list[list[tuple[str, ...]]]:
        """Devices, each a list of processes (each a tuple of roles)."""
        if not self.text:
            raise self.error("empty")
        devices: list[list[tuple[str, ...]]] = []
        while True:
            n = self.count()
            if self.peek() == "(":
                self.pos += 1
                members = []
                while True:
                    k = self.count()
                    members.extend([self.group()] * k)
                    if self.peek() == "-":
                        self.pos += 1
                        continue
                    if self.peek() != ")":
                        raise self.error("expected '-' or ')'")
                    self.pos += 1
                    break
                devices.extend([list(members) for _ in range(n)])
            else:
                roles = self.group()
                devices.extend([[roles] for _ in range(n)])
            if self.peek() == "":
                return devices
            if self.peek() != "-":
                raise self.error(f"unexpected {self.peek()!r}")
            self.pos += 1


def parse_topology(text: str) -> Topology:
    """Parse ``text`` (e.g. ``"2E-1P-1D"``, ``"(E-P)-D"``) into processes.

    Raises:
        ValueError: malformed notation, or no prefill or no decode instance (every request
            needs both; encoders are optional: text-only serving).
    """
    parser = _Parser(text)
    procs = tuple(
        ProcessSpec(roles, device)
        for device, members in enumerate(parser.parse())
        for roles in members
    )
    topo = Topology(parser.text, procs)
    for role in ("prefill", "decode"):
        if not topo.count(role):
            raise ValueError(f"topology {parser.text!r}: no {role} instance")
    return topo


def from_counts(encoders: int, prefills: int, decodes: int) -> Topology:
    """The fully disaggregated topology with these instance counts (``epd up --encoders N``)."""
    parts = [f"{n}{c}" for n, c in ((encoders, "E"), (prefills, "P"), (decodes, "D")) if n]
    return parse_topology("-".join(parts))


def file_part(deployment: str) -> str:
    """A file-name part for a deployment: ``(E-P)-D`` → ``E-P-coloc-D`` (distinct from ``E-P-D``'s),
    ``E-P-D@bfloat16`` → ``E-P-D-bfloat16``."""
    return re.sub(r"\((.*?)\)", r"\1-coloc", deployment).replace("@", "-")
