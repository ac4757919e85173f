"""Redis registry: instances with their load, and multimodal feature-cache metadata (DESIGN.md §5).

Keys (one namespace prefix, default ``epd``):

- ``{prefix}:inst:{instance_id}`` → JSON :class:`InstanceInfo`, expires after ``ttl_s`` unless
  refreshed by the instance's heartbeat. An expired key *is* a dead instance.
- ``{prefix}:mm:{mm_hash}`` → JSON :class:`FeatureEntry`: which encoder's pool holds an image's
  features and where; TTL set by the encoder, deleted when it evicts the entry.
- ``{prefix}:unreach`` → hash, field ``<target>|<prober>`` → JSON :class:`epd.registry.reach.Report`:
  a peer could not reach an instance at its advertised inbox (:mod:`epd.registry.reach`).

Signed entries (DESIGN.md §9): with the cluster secret every value is
``{"v": <the JSON object>, "exp": <unix ms>, "sig": <hex>}`` where ``sig`` is
``HMAC-SHA256(derive_key(secret, "registry"), len(key) || key || exp || canonical JSON of v)``
(lengths and ``exp`` 8-byte big-endian; canonical JSON: sorted keys, no spaces). The key name is
inside the MAC, so an entry copied under another key fails; ``exp`` (write time + TTL) bounds
how long a copy of an old entry, written back by someone with Redis access, is believed (plus
:data:`EXPIRY_GRACE_MS` of clock difference between hosts). Readers with the secret skip
unsigned, wrongly signed and expired entries (WARNING once per key). Readers without the secret
accept both forms unchecked, so tools without it can still look at a deployment.
Refresh a TTL by writing the entry again (``put_*``), never with Redis ``EXPIRE``: ``exp`` is signed.
"""

from __future__ import annotations

import hmac
import json
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from epd.registry.reach import ReachWatch, Report
from epd.wire.auth import derive_key

logger = logging.getLogger(__name__)

EXPIRY_GRACE_MS = 60_000  # clock difference between writer and reader accepted on ``exp``
_U64 = struct.Struct(">Q")
_WARNED_MAX = 10_000  # distinct keys remembered for "warn once"; then the memory starts over

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
        incarnation: random token of this process's life; a restarted instance keeps its id but not
            its incarnation, so peers know the requests the old one held are gone.
        draining: deregistering: still alive and finishing its requests, but not to be chosen.
        dtype: the dtype the instance computes and transfers in (``EPD_DTYPE`` resolved, e.g.
            ``bfloat16``); "" from a process that does not compute (the gateway).
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
    incarnation: str = ""
    draining: bool = False
    restarts: int = 0  # times the supervisor restarted this instance (EPD_RESTARTS)
    dtype: str = ""


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


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Registry:
    """Thin typed view of the Redis registry.

    Args:
        url: ``redis://[[user]:password@]host:port/db`` (``rediss://`` for TLS); redis-py's
            ``from_url`` takes the credentials from it.
        prefix: key namespace, so several deployments can share one Redis.
        secret: the cluster secret (:func:`epd.wire.auth.load_secret`): entries are signed and
            checked (module docstring); ``None``: plain JSON, nothing checked.

    Raises:
        RegistryError: on connection or authentication failure (from any method); its message
            shows the URL without the password.
    """

    def __init__(self, url: str, prefix: str = "epd", secret: bytes | None = None) -> None:
        self.url = url
        self.prefix = prefix
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._key = derive_key(secret, "registry") if secret else None
        self._warned: set[str] = set()

    def _inst_key(self, instance_id: str) -> str:
        return f"{self.prefix}:inst:{instance_id}"

    def _mm_key(self, mm_hash: str) -> str:
        return f"{self.prefix}:mm:{mm_hash}"

    def _unreach_key(self) -> str:
        return f"{self.prefix}:unreach"

    def _error(self, exc: redis.RedisError) -> RegistryError:
        return RegistryError(f"Redis at {redact_url(self.url)}: {exc}")

    # -- signing ---------------------------------------------------------------------------
    def _sig(self, key: str, exp_ms: int, canonical: bytes) -> str:
        name = key.encode()
        msg = b"".join((_U64.pack(len(name)), name, _U64.pack(exp_ms), canonical))
        return hmac.new(self._key, msg, "sha256").hexdigest()

    def _encode(self, key: str, obj: dict[str, Any], ttl_s: float) -> str:
        if self._key is None:
            return json.dumps(obj)
        exp_ms = time.time_ns() // 1_000_000 + int(ttl_s * 1000)
        canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
        return json.dumps({"v": obj, "exp": exp_ms, "sig": self._sig(key, exp_ms, canonical.encode())})

    def _decode(self, key: str, raw: bytes) -> dict[str, Any] | None:
        """The entry's object, or ``None`` (logged once per key) when it must not be trusted.

        Raises:
            ValueError: not JSON.
        """
        doc = json.loads(raw)
        signed = isinstance(doc, dict) and set(doc) == {"v", "exp", "sig"}
        if self._key is None:
            return doc["v"] if signed else doc
        reason = None
        if not signed:
            reason = "unsigned (written without EPD_CLUSTER_SECRET, or forged)"
        elif not (isinstance(doc["v"], dict) and isinstance(doc["exp"], int) and isinstance(doc["sig"], str)):
            reason = "malformed signature fields"
        else:
            canonical = json.dumps(doc["v"], sort_keys=True, separators=(",", ":")).encode()
            if not hmac.compare_digest(doc["sig"].encode(), self._sig(key, doc["exp"], canonical).encode()):
                reason = "bad signature (another EPD_CLUSTER_SECRET, altered, or copied from another key)"
            elif doc["exp"] + EXPIRY_GRACE_MS < time.time_ns() // 1_000_000:
                reason = "signature expired (an old entry written back)"
        if reason is None:
            return doc["v"]
        self._warn_once(key, "registry entry %s ignored: %s", key, reason)
        return None

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            if len(self._warned) >= _WARNED_MAX:
                self._warned.clear()
            self._warned.add(key)
            logger.warning(msg, *args)

    # -- instances ---------------------------------------------------------------------------
    def ping(self) -> None:
        try:
            self.r.ping()
        except redis.RedisError as exc:
            raise RegistryError(f"Redis at {redact_url(self.url)} unreachable: {exc}") from exc

    def put_instance(self, info: InstanceInfo, ttl_s: float) -> None:
        """Register or refresh ``info`` with a TTL of ``ttl_s`` seconds."""
        key = self._inst_key(info.instance_id)
        try:
            self.r.set(key, self._encode(key, asdict(info), ttl_s), px=int(ttl_s * 1000))
        except redis.RedisError as exc:
            raise self._error(exc) from exc

    def remove_instance(self, instance_id: str) -> None:
        try:
            self.r.delete(self._inst_key(instance_id))
        except redis.RedisError as exc:
            raise self._error(exc) from exc

    def instances(self, role: str | None = None, reachable_only: bool = True) -> list[InstanceInfo]:
        """Live instances (those whose TTL has not expired), optionally only those hosting ``role``.

        Entries that are malformed or (with a secret) not validly signed are skipped, and so is an
        incarnation a peer reported unreachable (:meth:`unreachable`) unless ``reachable_only`` is False.
        """
        try:
            keys = list(self.r.scan_iter(match=self._inst_key("*"), count=500))
            values = self.r.mget(keys) if keys else []
        except redis.RedisError as exc:
            raise self._error(exc) from exc
        out = []
        for key, raw in zip(keys, values, strict=True):
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                obj = self._decode(key.decode(), raw)
                if obj is None:
                    continue
                info = InstanceInfo(**obj)
            except (TypeError, ValueError, KeyError) as exc:
                logger.warning("malformed registry entry %s skipped: %s", key, exc)
                continue
            if role is None or role in info.roles:
                out.append(info)
        if reachable_only and out:
            cut = {(r.target, r.incarnation): r for r in self.unreachable()}
            for info in [i for i in out if (i.instance_id, i.incarnation) in cut]:
                out.remove(info)
                r = cut[(info.instance_id, info.incarnation)]
                self._warn_once(f"unreach:{info.instance_id}:{info.incarnation}", "instance %s left out: peer %s could "
                                "not reach it at %s (%s)", info.instance_id, r.prober, r.address, r.error)
        return sorted(out, key=lambda i: i.instance_id)

    # -- reachability reports (epd.registry.reach) ------------------------------------------
    def put_unreachable(self, report: Report, ttl_s: float) -> None:
        """Record (or renew) that ``report.prober`` cannot reach ``report.target``."""
        key, field_ = self._unreach_key(), f"{report.target}|{report.prober}"
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(key, field_, self._encode(f"{key}:{field_}", asdict(report), ttl_s))
            pipe.pexpire(key, int(ttl_s * 3000))  # the whole hash goes once nobody reports
            pipe.execute()
        except redis.RedisError as exc:
            raise self._error(exc) from exc

    def delete_unreachable(self, target: str, prober: str) -> None:
        try:
            self.r.hdel(self._unreach_key(), f"{target}|{prober}")
        except redis.RedisError as exc:
            raise self._error(exc) from exc

    def unreachable(self) -> list[Report]:
        """Reports still in force (``until_ms`` not passed; with a secret, validly signed)."""
        try:
            raw = self.r.hgetall(self._unreach_key())
        except redis.RedisError as exc:
            raise self._error(exc) from exc
        now_ms = time.time_ns() // 1_000_000
        out = []
        for field_, value in raw.items():
            key = f"{self._unreach_key()}:{field_.decode()}"
            try:
                obj = self._decode(key, value)
                report = Report(**obj) if obj is not None else None
            except (TypeError, ValueError, KeyError) as exc:
                logger.warning("malformed registry entry %s skipped: %s", key, exc)
                continue
            if report is not None and report.until_ms >= now_ms:
                out.append(report)
        return out

    # -- feature cache ----------------------------------------------------------------------
    def put_feature(self, mm_hash: str, entry: FeatureEntry, ttl_s: float) -> None:
        key = self._mm_key(mm_hash)
        try:
            self.r.set(key, self._encode(key, asdict(entry), ttl_s), px=int(ttl_s * 1000))
        except redis.RedisError as exc:
            raise self._error(exc) from exc

    def get_feature(self, mm_hash: str) -> FeatureEntry | None:
        """The entry, or ``None`` when absent, malformed or (with a secret) not validly signed."""
        key = self._mm_key(mm_hash)
        try:
            raw = self.r.get(key)
        except redis.RedisError as exc:
            raise self._error(exc) from exc
        if not raw:
            return None
        try:
            obj = self._decode(key, raw)
            return FeatureEntry(**obj) if obj is not None else None
        except (TypeError, ValueError, KeyError) as exc:
            logger.warning("malformed registry entry %s skipped: %s", key, exc)
            return None

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
            raise self._error(exc) from exc


class Heartbeat(threading.Thread):
    """Re-registers an instance every ``period_s`` with its current load.

    Args:
        registry: where to publish.
        info: the instance's entry; ``info.load`` is replaced by ``load_fn()`` each beat.
        load_fn: returns the current load dict (called from this thread: must be thread-safe).
        period_s: seconds between beats (keep well under ``ttl_s``).
        ttl_s: entry TTL; the instance counts as dead this long after its last beat.

    While it runs, a :class:`epd.registry.reach.ReachWatch` (attribute ``reach``) probes the other
    instances' advertised inboxes every ``period_s`` and reports those it cannot reach.
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
        self.reach = ReachWatch(registry, info, period_s, ttl_s)  # peers' reachability (epd.registry.reach)

    def beat(self) -> None:
        self.info.load = self.load_fn()
        self.registry.put_instance(self.info, self.ttl_s)

    def run(self) -> None:
        self.reach.start()
        while not self._halt.wait(self.period_s):
            try:
                self.beat()
            except Exception:  # keep beating; a Redis blip must not kill the instance
                logger.exception("instance %s: heartbeat failed", self.info.instance_id)

    def stop(self, deregister: bool = True) -> None:
        """Stop beating and (by default) remove the entry at once."""
        self._halt.set()
        self.reach.stop()
        if self.is_alive():
            self.join(timeout=self.period_s + 1)
        if deregister:
            try:
                self.registry.remove_instance(self.info.instance_id)
            except RegistryError:
                logger.warning("instance %s: could not deregister", self.info.instance_id)
