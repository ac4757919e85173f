"""A deployment as the simulator and ``epd plan`` see it: a topology in the papers' notation
(:mod:`epd.topology`, what ``epd up --topology`` accepts), per-role limits (the ``EPD_*``
knobs), the gateway's routing policy, and where each process runs.

Placement follows the launcher:

- **cpu profile** — every process runs on this one host and shares its cores; each gets
  ``EPD_TORCH_THREADS`` from :func:`epd.cores.split_cores` (or the user's override), as
  ``epd up`` does. The gateway and the load generator share the same cores.
- **accelerator profile** — every ``-``-separated element of the topology is one device;
  processes of a ``( … )`` group and the roles of a co-located process share their device.
  The gateway runs on the host CPU, apart.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, replace

from epd.topology import ProcessSpec, parse_topology

ROUTING = ("least-loaded", "round-robin")


class DeploymentError(ValueError):
    """A deployment that cannot be simulated (bad notation, bad limit)."""


@dataclass(frozen=True)
class Limits:
    """Per-role batch limits and pool sizes (the ``EPD_*`` variable of each in brackets).

    Attributes:
        encoder_max_images: images per vision forward (EPD_ENCODER_MAX_IMAGES).
        encoder_max_patches: patches per vision forward (EPD_ENCODER_MAX_PATCHES).
        prefill_max_tokens: token budget of one packed prefill (EPD_PREFILL_MAX_TOKENS).
        kv_layer_group: layers per KV transfer group; 0 = after the forward (EPD_KV_LAYER_GROUP).
        decode_max_batch: requests per decode step (EPD_DECODE_MAX_BATCH).
        kv_block_size: tokens per KV block (EPD_KV_BLOCK_SIZE).
        kv_blocks: KV blocks per decode instance; 0 = from ``kv_memory_mb`` (cpu) or from the
            device memory left after the weights (accelerator) (EPD_KV_BLOCKS).
        kv_memory_mb: decode pool size on cpu when ``kv_blocks`` is 0 (EPD_KV_MEMORY_MB).
        feature_pool_mb: encoder feature pool (EPD_FEATURE_POOL_MB).
    """

    encoder_max_images: int = 8
    encoder_max_patches: int = 16384
    prefill_max_tokens: int = 4096
    kv_layer_group: int = 2
    decode_max_batch: int = 64
    kv_block_size: int = 16
    kv_blocks: int = 0
    kv_memory_mb: int = 256
    feature_pool_mb: int = 256

    def check(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value < (0 if name in ("kv_layer_group", "kv_blocks") else 1):
                raise DeploymentError(f"{name} = {value!r}: must be an integer ≥ "
                                      f"{0 if name in ('kv_layer_group', 'kv_blocks') else 1}")

    def env(self) -> dict[str, str]:
        """The ``EPD_*`` variables that set these limits (only those that differ from the defaults)."""
        out = {}
        for name, value in self.__dict__.items():
            if value != getattr(Limits, name):
                out[f"EPD_{name.upper()}"] = str(value)
        return out


@dataclass(frozen=True)
class Placed:
    """One process of the deployment, placed.

    Attributes:
        name: ``encoder-0``, ``ep-0``, … (the launcher's names).
        roles: roles it hosts.
        device: device index (accelerator) — 0 for every process on cpu.
        threads: host threads (``EPD_TORCH_THREADS``) on cpu; 1 on an accelerator.
    """

    name: str
    roles: tuple[str, ...]
    device: int
    threads: int


@dataclass(frozen=True)
class Deployment:
    """What to simulate.

    Attributes:
        topology: notation (``E-P-D``, ``2E-1P-1D``, ``EP-D``, ``(E-P)-D``, …).
        limits: per-role knobs.
        routing: gateway policy, ``least-loaded`` (what the gateway implements) or ``round-robin``.
        cores: host cores (cpu profiles); ``None`` = the profile's.
        torch_threads: ``EPD_TORCH_THREADS`` override for every process (0: the launcher's split).
        heartbeat_s, registry_refresh_s: load publication and the gateway's view refresh.
        request_timeout_s: every stage fails a request older than this (EPD_REQUEST_TIMEOUT_S).
        ep_coupled: a process hosting encoder and prefill runs them as *one* engine (the papers'
            EP-D baseline, vLLM-style: a step encodes the images of the requests it prefills,
            then prefills them; images never leave their prefill instance) instead of epd-serve's
            two logically isolated loops sharing the device. For comparisons with the papers only.
    """

    topology: str = "E-P-D"
    limits: Limits = field(default_factory=Limits)
    routing: str = "least-loaded"
    cores: int | None = None
    torch_threads: int = 0
    heartbeat_s: float = 1.0
    registry_refresh_s: float = 0.5
    request_timeout_s: float = 120.0
    ep_coupled: bool = False

    def __post_init__(self) -> None:
        try:
            topo = parse_topology(self.topology)
        except ValueError as exc:
            raise DeploymentError(str(exc)) from None
        object.__setattr__(self, "topology", topo.notation)
        if self.routing not in ROUTING:
            raise DeploymentError(f"routing {self.routing!r}: expected one of {', '.join(ROUTING)}")
        self.limits.check()

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", self.topology).strip("_")

    @property
    def num_devices(self) -> int:
        return parse_topology(self.topology).num_devices

    def with_limits(self, **changes) -> Deployment:
        return replace(self, limits=replace(self.limits, **changes))

    def place(self, device_kind: str, cores: int) -> list[Placed]:
        """The processes with their device and threads (see the module docstring)."""
        from epd.cores import split_cores

        procs: list[ProcessSpec] = list(parse_topology(self.topology).processes)
        if device_kind == "cpu":
            threads = ([self.torch_threads] * len(procs) if self.torch_threads
                       else split_cores([p.roles for p in procs], cores))
        else:
            threads = [1] * len(procs)
        seen: dict[str, int] = {}
        out = []
        for spec, n in zip(procs, threads, strict=True):
            key = spec.roles[0] if len(spec.roles) == 1 else spec.name.lower()
            out.append(Placed(f"{key}-{seen.get(key, 0)}", spec.roles, 0 if device_kind == "cpu" else spec.device, n))
            seen[key] = seen.get(key, 0) + 1
        return out

    def env(self) -> dict[str, str]:
        """The environment that runs this deployment with ``epd up`` (EPD_TOPOLOGY + limits)."""
        return {"EPD_TOPOLOGY": self.topology, **self.limits.env()}

    def compose_env(self) -> dict[str, str] | None:
        """``EPD_ENCODERS/PREFILLS/DECODES`` + limits for ``compose/docker-compose.yml`` (which runs
        one role per container), or ``None`` when the topology co-locates roles."""
        procs = parse_topology(self.topology).processes
        if any(len(p.roles) > 1 for p in procs) or "(" in self.topology:
            return None
        counts = {r: sum(p.roles == (r,) for p in procs) for r in ("encoder", "prefill", "decode")}
        return {"EPD_ENCODERS": str(counts["encoder"]), "EPD_PREFILLS": str(counts["prefill"]),
                "EPD_DECODES": str(counts["decode"]), **self.limits.env()}

    @classmethod
    def from_args(cls, args: argparse.Namespace, prof) -> Deployment:
        """From ``epd plan --topology T`` and its limit flags."""
        limits = Limits(encoder_max_images=args.encoder_max_images, encoder_max_patches=args.encoder_max_patches,
                        prefill_max_tokens=args.prefill_max_tokens, kv_layer_group=args.kv_layer_group,
                        decode_max_batch=args.decode_max_batch, kv_memory_mb=args.kv_memory_mb)
        return cls(topology=args.topology, limits=limits, routing=args.routing, cores=args.cores,
                   ep_coupled=getattr(args, "ep_coupled", False))


def notation(shape: str, counts: tuple[int, ...]) -> str:
    """The topology of a shape family with instance counts.

    ``shape``: ``E-P-D`` (counts E, P, D), ``EP-D`` (EP, D), ``E-PD`` (E, PD), ``EPD`` (n),
    ``(E-P)-D`` ((E-P) pairs, D). Counts of 1 are written too (``1E-1P-1D``) except for the
    plain shape with every count 1, which is written as the family itself.

    Raises:
        DeploymentError: unknown shape or a count < 1.
    """
    if any(c < 1 for c in counts):
        raise DeploymentError(f"{shape}: every count must be ≥ 1 (got {counts})")
    parts = {"E-P-D": ("E", "P", "D"), "EP-D": ("EP", "D"), "E-PD": ("E", "PD"), "EPD": ("EPD",),
             "(E-P)-D": ("(E-P)", "D")}
    if shape not in parts or len(parts[shape]) != len(counts):
        raise DeploymentError(f"unknown shape {shape!r} for counts {counts} (expected one of {', '.join(parts)})")
    if all(c == 1 for c in counts):
        return shape
    return "-".join(f"{c}{p}" for c, p in zip(counts, parts[shape], strict=True))


SHAPES = ("E-P-D", "EP-D", "E-PD", "EPD", "(E-P)-D")
