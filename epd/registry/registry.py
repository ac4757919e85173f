"""Redis registry: instances with their load, and multimodal feature-cache metadata (DESIGN.md §5).

Keys (one namespace prefix, default ``epd``):

- ``{prefix}:inst:{instance_id}`` → JSON :class:`InstanceInfo`, expires after ``ttl_s`` unless
  refreshed by the instance's heartbeat. An expired key *is* a dead instance.
- ``{prefix}:mm:{mm_hash}`` → JSON :class:`FeatureEntry`: which encoder's pool holds an image's
  features and where; TTL set by the encoder, deleted when it evicts the entry.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import redis

logger = logging.getLogger(__name__)

ROLES = ("encoder", "prefill", "decode", "gateway")


class RegistryError(RuntimeError):
    """Redis is unreachable or holds a malformed entry."""


@dataclass
class InstanceInfo:
    """What peers need to know about one instance.

    Attributes:
        instance_id: unique id (``role-host-pid`` by default).
        roles: subset of :data:`ROLES` hosted by the process.
        inbox: ZeroMQ PULL address, ``tcp://host:port``.
        transfer_handle: handle of the instance's registered region ("" when none).
        model: model directory or name served.
        admin: gRPC address (``host:port``) of the process's health + admin service ("" when none).
        capacity: static sizes (e.g. ``{"kv_blocks": 512, "block_size": 16}``).
        load: current load published by heartbeat (encoder: ``queued_images``,
            ``queued_patches``; prefill: ``queued_tokens``, ``features_pending``; decode:
            ``running``, ``free_blocks``, ``total_blocks``).
    """

    instance_id: str
    roles: list[str]
    inbox: str
    transfer_handle: str = ""
    model: str = ""
    capacity: dict[str, int] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    pid: int = 0
    admin: str = ""


@dataclass
class FeatureEntry:
    """Where one image's encoder output lives (value of ``{prefix}:mm:{mm_hash}``).

    Attributes:
        holder: encoder instance id.
        handle: transfer handle of the holder's feature pool.
        offset: byte offset in the pool; nbytes: length in bytes.
        dtype, shape: ``[num_tokens, hidden]`` features.
        grid_thw: the patch grid the features came from.
    """

    holder: str
    handle: str
    offset: int
    nbytes: int
    dtype: str
    shape: list[int]
    grid_thw: list[int]


class Registry:
    """Thin typed view of the Redis registry.

    Args:
        url: ``redis://host:port/db``.
        prefix: key namespace, so several deployments can share one Redis.

    Raises:
        RegistryError: on connection failure (from any method).
    """

    def __init__(self, url: str, prefix: str = "epd") -> None:
        self.url = url
        self.prefix = prefix
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    def _inst_key(self, instance_id: str) -> str:
        return f"{self.prefix}:inst:{instance_id}"

    def _mm_key(self, mm_hash: str) -> str:
        return f"{self.prefix}:mm:{mm_hash}"

    def ping(self) -> None:
        try:
            self.r.ping()
        except redis.RedisError as exc:
            raise RegistryError(f"Redis at {self.url} unreachable: {exc}") from exc

    def put_instance(self, info: InstanceInfo, ttl_s: float) -> None:
        """Register or refresh ``info`` with a TTL of ``ttl_s`` seconds."""
        try:
            self.r.set(self._inst_key(info.instance_id), json.dumps(asdict(info)), px=int(ttl_s * 1000))
        except redis.RedisError as exc:
            raise RegistryError(str(exc)) from exc

    def remove_instance(self, instance_id: str) -> None:
        try:
            self.r.delete(self._inst_key(instance_id))
        except redis.RedisError as exc:
            raise RegistryError(str(exc)) from exc

    def instances(self, role: str | None = None) -> list[InstanceInfo]:
        """Live instances (those whose TTL has not expired), optionally only those hosting ``role``."""
        try:
            keys = list(self.r.scan_iter(match=self._inst_key("*"), count=500))
            values = self.r.mget(keys) if keys else []
        except redis.RedisError as exc:
            raise RegistryError(str(exc)) from exc
        out = []
        for raw in values:
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                info = InstanceInfo(**json.loads(raw))
            except (TypeError, ValueError) as exc:
                logger.warning("malformed registry entry skipped: %s", exc)
                continue
            if role is None or role in info.roles:
                out.append(info)
        return sorted(out, key=lambda i: i.instance_id)

    def put_feature(self, mm_hash: str, entry: FeatureEntry, ttl_s: float) -> None:
        try:
            self.r.set(self._mm_key(mm_hash), json.dumps(asdict(entry)), px=int(ttl_s * 1000))
        except redis.RedisError as exc:
            raise RegistryError(str(exc)) from exc

    def get_feature(self, mm_hash: str) -> FeatureEntry | None:
        try:
            raw = self.r.get(self._mm_key(mm_hash))
        except redis.RedisError as exc:
            raise RegistryError(str(exc)) from exc
        return FeatureEntry(**json.loads(raw)) if raw else None

    def delete_feature(self, mm_hash: str, holder: str | None = None) -> None:
        """Delete the entry (only if still held by ``holder``, when given)."""
        try:
            if holder is None:
                self.r.delete(self._mm_key(mm_hash))
                return
            entry = self.get_feature(mm_hash)
            if entry is not None and entry.holder == holder:
                self.r.delete(self._mm_key(mm_hash))
        except redis.RedisError as exc:
            raise RegistryError(str(exc)) from exc


class Heartbeat(threading.Thread):
    """Re-registers an instance every ``period_s`` with its current load.

    Args:
        registry: where to publish.
        info: the instance's entry; ``info.load`` is replaced by ``load_fn()`` each beat.
        load_fn: returns the current load dict (called from this thread: must be thread-safe).
        period_s: seconds between beats (keep well under ``ttl_s``).
        ttl_s: entry TTL; the instance counts as dead this long after its last beat.
    """

    def __init__(
        self,
        registry: Registry,
        info: InstanceInfo,
        load_fn: Callable[[], dict[str, float]],
        period_s: float,
        ttl_s: float,
    ) -> None:
        super().__init__(name=f"heartbeat-{info.instance_id}", daemon=True)
        self.registry, self.info, self.load_fn = registry, info, load_fn
        self.period_s, self.ttl_s = period_s, ttl_s
        self._halt = threading.Event()

    def beat(self) -> None:
        self.info.load = self.load_fn()
        self.registry.put_instance(self.info, self.ttl_s)

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            try:
                self.beat()
            except Exception:  # keep beating; a Redis blip must not kill the instance
                logger.exception("instance %s: heartbeat failed", self.info.instance_id)

    def stop(self, deregister: bool = True) -> None:
        """Stop beating and (by default) remove the entry at once."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=self.period_s + 1)
        if deregister:
            try:
                self.registry.remove_instance(self.info.instance_id)
            except RegistryError:
                logger.warning("instance %s: could not deregister", self.info.instance_id)
