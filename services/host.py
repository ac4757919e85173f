"""Composition root of a backend process: build the Proc of each hosted role and run them.

``python -m services`` hosts the roles in ``EPD_ROLES`` (co-location, DESIGN.md §4);
``python -m services.encoder`` (and prefill, decode) host exactly one role. This module is
the one place that knows every service, so no service imports another.

Co-located roles get their own inbox, queue, loop thread and registry entry (instance id
``<EPD_INSTANCE_ID>-<role>``; with a fixed ``EPD_PORT`` the i-th role binds ``EPD_PORT + i``)
and share one loaded model (``Qwen2VLAdapter``) among the Procs that accept ``adapter=``: it
holds the union of those roles' weights (``role_parts``: EP loads vision + language, PD the
language model only), loaded once. :func:`proc_factory` builds another role's Proc for an
in-place role switch (:meth:`epd.process_host.ProcessHost.switch_role`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import socket

from epd import config
from epd.device import set_threads
from epd.process_host import ProcessHost
from epd.service import connect_registry, setup_logging
from epd.topology import letters, parse_roles

logger = logging.getLogger(__name__)

_PROCS = {
    "encoder": (config.EncoderConfig, "services.encoder.proc", "EncoderProc"),
    "prefill": (config.PrefillConfig, "services.prefill.proc", "PrefillProc"),
    "decode": (config.DecodeConfig, "services.decode.proc", "DecodeProc"),
}


def role_configs(roles: tuple[str, ...]) -> list[config.CommonConfig]:
    """Each role's typed config from the environment, with per-role id and port when co-located.

    Raises:
        ConfigError: a bad or missing variable (names it).
    """
    base = config.load(config.CommonConfig)
    if len(roles) == 1:
        return [config.load(_PROCS[roles[0]][0])]
    prefix = base.instance_id or f"{letters(roles)}-{socket.gethostname()}-{os.getpid()}"
    return [
        config.load(_PROCS[role][0], instance_id=f"{prefix}-{role}", port=base.port + i if base.port else 0)
        for i, role in enumerate(roles)
    ]


def _takes_adapter(cls: type) -> bool:
    return "adapter" in inspect.signature(cls.__init__).parameters


def _shared_adapter(cfg: config.CommonConfig, roles: tuple[str, ...], classes: list[type]):
    """One model for the co-located roles whose Procs take ``adapter=`` (when two or more do),
    holding the union of the weights those roles need."""
    sharing = [r for r, c in zip(roles, classes, strict=True) if _takes_adapter(c)]
    if len(sharing) < 2:
        return None
    from epd.device import torch_dtype
    from epd.models.qwen2_vl import Qwen2VLAdapter, role_parts

    return Qwen2VLAdapter.load(cfg.model, dtype=torch_dtype(cfg.dtype), parts=role_parts(*sharing),
                                batch_invariant=cfg.batch_invariant)


def switched_instance_id(base: str, role: str, original: dict[str, str]) -> str:
    """Instance id of ``role`` after a role switch: its id at start if the process started with
    that role (``original``: role -> id), else ``<name>-as-<role>`` where ``name`` is the
    launcher's process name (``EPD_INSTANCE_ID`` up to any ``-as-``), or ``name`` itself when it
    is ``<role>-<i>`` (a process restarted as decode after a switch becomes ``prefill-1`` again)."""
    if role in original:
        return original[role]
    name = base.split("-as-", 1)[0]
    return name if name.rsplit("-", 1)[0] == role else f"{name}-as-{role}"


def proc_factory(procs: list):
    """The :data:`epd.process_host.ProcFactory` of this process: builds the proc of another role
    for an in-place role switch, reusing the previous proc's model when it holds every part the
    new role needs (prefill ↔ decode: the language model) and loading the weights otherwise.

    Raises (from the returned function):
        ConfigError: a bad variable for the new role. Any error of the weights or the region.
    """
    base = config.load(config.CommonConfig).instance_id or f"{socket.gethostname()}-{os.getpid()}"
    original = {p.role: p.instance_id for p in procs}

    def build(role: str, previous):
        from epd.models.qwen2_vl import role_parts

        cls = getattr(importlib.import_module(_PROCS[role][1]), _PROCS[role][2])
        cfg = config.load(_PROCS[role][0], instance_id=switched_instance_id(base, role, original),
                          port=previous.config.port)
        adapter = getattr(previous, "adapter", None)
        reuse = adapter is not None and _takes_adapter(cls) and set(role_parts(role)) <= set(adapter.parts)
        return (cls(cfg, adapter=adapter) if reuse else cls(cfg)), reuse

    return build


def run(roles: tuple[str, ...]) -> int:
    """Host ``roles`` in this process until drained or stopped; returns the exit code.

    Raises:
        ConfigError: bad configuration, or Redis unreachable after EPD_REDIS_RETRY_S.
    """
    configs = role_configs(roles)
    setup_logging(configs[0].log_level, letters(roles) if len(roles) > 1 else roles[0])
    # before any torch work: the inter-op pool can be sized only before it starts
    intra, inter = set_threads(configs[0].torch_threads, configs[0].torch_interop_threads)
    logger.info("torch threads: %d intra-op, %d inter-op", intra, inter)
    connect_registry(configs[0].redis_url, configs[0].redis_retry_s)  # fail fast, before the weights load
    classes = [getattr(importlib.import_module(_PROCS[r][1]), _PROCS[r][2]) for r in roles]
    adapter = _shared_adapter(configs[0], roles, classes)
    procs = [
        cls(cfg, adapter=adapter) if adapter is not None and _takes_adapter(cls) else cls(cfg)
        for cls, cfg in zip(classes, configs, strict=True)
    ]
    if len(roles) > 1:
        shared = [r for r, c in zip(roles, classes, strict=True) if adapter is not None and _takes_adapter(c)]
        logger.info("hosting %s in one process; model shared by: %s", ", ".join(roles), ", ".join(shared) or "none")
    return ProcessHost(procs, proc_factory(procs)).run()


def main(role: str | None = None) -> int:
    """Entry point: ``role`` given (``python -m services.<role>``) or ``EPD_ROLES``.

    Raises:
        ConfigError: EPD_ROLES missing or naming an unknown role, or any other bad variable.
    """
    if role is not None:
        return run((role,))
    spec = config.load(config.CommonConfig).roles
    if not spec:
        raise config.ConfigError("EPD_ROLES: no role given (e.g. encoder,prefill or EP)")
    return run(parse_roles(spec))
