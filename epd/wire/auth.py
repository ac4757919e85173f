"""Authentication of the control plane from one cluster secret (DESIGN.md §9).

Every process of a deployment shares ``EPD_CLUSTER_SECRET`` (or reads it from
``EPD_CLUSTER_SECRET_FILE``). From it :func:`derive_key` derives one key per purpose, so a key
that leaks from one use cannot forge another:

- ``"wire"``: :class:`Signer` appends a MAC frame to every ZeroMQ message and checks it on
  receipt;
- ``"registry"``: :class:`epd.registry.registry.Registry` signs the entries it writes to Redis;
- ``"admin"``: the gRPC ``epd.admin.v1.Admin`` methods (Stats, Drain) want
  ``authorization: Bearer <hex of the admin key>`` (:func:`admin_token`).

Without a secret nothing is authenticated, which :func:`check_exposure` allows only for
processes bound to loopback. A MAC proves that the sender knows the secret, nothing more:
every holder of the secret can speak for every instance, and nothing is encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import time
from pathlib import Path

from epd.config import ConfigError
from epd.wire.codec import WireError

MIN_SECRET_BYTES = 16
PURPOSES = ("wire", "registry", "admin")
_TS = struct.Struct(">Q")  # 8-byte big-endian unsigned: timestamps and frame lengths
MAC_FRAME_BYTES = _TS.size + hashlib.sha256().digest_size  # 40
_SALT = b"epd-serve cluster secret v1"


class AuthError(WireError):
    """A message carries no MAC, a wrong one, or a timestamp outside the replay window."""


def load_secret(secret: str, secret_file: Path | None) -> bytes | None:
    """The cluster secret from ``EPD_CLUSTER_SECRET`` / ``EPD_CLUSTER_SECRET_FILE``.

    Args:
        secret: the value of EPD_CLUSTER_SECRET ("" = not set); surrounding whitespace is dropped.
        secret_file: EPD_CLUSTER_SECRET_FILE; its first line, stripped, is the secret.

    Returns:
        The secret bytes, or ``None`` when neither is set (authentication off).

    Raises:
        ConfigError: both are set; the file is unreadable or its first line is empty (names
            EPD_CLUSTER_SECRET_FILE); the secret is shorter than 16 bytes (names EPD_CLUSTER_SECRET).
    """
    value = secret.strip().encode()
    if secret_file is not None:
        if value:
            raise ConfigError("EPD_CLUSTER_SECRET and EPD_CLUSTER_SECRET_FILE are both set: set one")
        try:
            value = secret_file.read_bytes().split(b"\n", 1)[0].strip()
        except OSError as exc:
            raise ConfigError(f"EPD_CLUSTER_SECRET_FILE: cannot read {secret_file}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"EPD_CLUSTER_SECRET_FILE: the first line of {secret_file} is empty")
    if not value:
        return None
    if len(value) < MIN_SECRET_BYTES:
        source = "EPD_CLUSTER_SECRET" if secret_file is None else f"EPD_CLUSTER_SECRET_FILE ({secret_file})"
        raise ConfigError(
            f"EPD_CLUSTER_SECRET: the secret from {source} is {len(value)} bytes; use at least "
            f"{MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -hex 32`)"
        )
    return value


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one ``purpose`` (``"wire"``, ``"registry"``, ``"admin"``).

    HKDF-SHA256 (RFC 5869: extract with a fixed salt, expand one block with ``purpose`` as info),
    so keys of different purposes are independent.

    Raises:
        ValueError: ``secret`` or ``purpose`` is empty.
    """
    if not secret or not purpose:
        raise ValueError("derive_key needs a non-empty secret and purpose")
    prk = hmac.digest(_SALT, secret, "sha256")
    return hmac.digest(prk, purpose.encode() + b"\x01", "sha256")


def admin_token(secret: bytes | None) -> bytes | None:
    """The admin key (``derive_key(secret, "admin")``) or ``None`` without a secret: what
    :class:`epd.admin.AdminServer` takes as ``token`` and the admin clients send (hex)."""
    return derive_key(secret, "admin") if secret else None


def is_loopback(host: str) -> bool:
    """``localhost``, ``127.0.0.0/8``, ``::1`` (brackets allowed, IPv4-mapped too)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def check_exposure(host: str, secret: bytes | None, variable: str) -> None:
    """Refuse to listen beyond loopback without a secret.

    Args:
        host: the address a socket binds or advertises.
        secret: the cluster secret, or ``None``.
        variable: the setting ``host`` came from (``"EPD_HOST"``, ``"EPD_GATEWAY_HOST"``…).

    Raises:
        ConfigError: ``host`` is not a loopback address and ``secret`` is ``None``.
    """
    if secret is None and not is_loopback(host):
        raise ConfigError(
            f"{variable}={host!r} is not a loopback address: set EPD_CLUSTER_SECRET (or "
            "EPD_CLUSTER_SECRET_FILE) on every process so control messages are authenticated, "
            f"or bind {variable} to 127.0.0.1"
        )


class Signer:
    """Appends and checks the MAC frame of a ZeroMQ message.

    MAC frame (40 bytes): 8-byte big-endian unix time in milliseconds, then
    ``HMAC-SHA256(derive_key(secret, "wire"), timestamp || for each frame: 8-byte big-endian
    length || frame bytes)``. The lengths bind the frame boundaries; the timestamp bounds replay
    to ±``window_s`` (a captured message can be replayed within the window; receivers
    must still check that a message comes from the peer they expect).

    Args:
        secret: the cluster secret; ``None`` disables signing and checking.
        window_s: accepted clock difference between sender and receiver, seconds.

    Thread-safe: the keyed HMAC state is copied per message.
    """

    def __init__(self, secret: bytes | None, window_s: float = 60.0) -> None:
        self._window_ms = int(window_s * 1000)
        self._hmac = hmac.new(derive_key(secret, "wire"), digestmod="sha256") if secret else None

    @property
    def enabled(self) -> bool:
        return self._hmac is not None

    @staticmethod
    def _mac(keyed: hmac.HMAC, stamp: bytes, frames: list[bytes]) -> bytes:
        h = keyed.copy()
        h.update(stamp)
        for frame in frames:
            h.update(_TS.pack(len(frame)))
            h.update(frame)
        return h.digest()

    def sign(self, frames: list[bytes]) -> list[bytes]:
        """``frames`` plus the MAC frame (``frames`` itself, unchanged, when disabled)."""
        keyed = self._hmac
        if keyed is None:
            return frames
        stamp = _TS.pack(time.time_ns() // 1_000_000)
        return [*frames, stamp + self._mac(keyed, stamp, frames)]

    def verify(self, frames: list[bytes]) -> list[bytes]:
        """``frames`` without the MAC frame (unchanged when disabled).

        Raises:
            AuthError: no MAC frame or a short one, a MAC that does not match, or a
                timestamp more than ``window_s`` from this host's clock.
        """
        keyed = self._hmac
        if keyed is None:
            return frames
        if len(frames) < 2 or len(frames[-1]) != MAC_FRAME_BYTES:
            raise AuthError("message without a valid MAC frame (is EPD_CLUSTER_SECRET set on the sender?)")
        body, tag = frames[:-1], bytes(frames[-1])
        stamp = tag[: _TS.size]
        if not hmac.compare_digest(tag[_TS.size :], self._mac(keyed, stamp, body)):
            raise AuthError("bad MAC: sender uses another EPD_CLUSTER_SECRET, or the message was altered")
        skew_ms = _TS.unpack(stamp)[0] - time.time_ns() // 1_000_000
        if abs(skew_ms) > self._window_ms:
            raise AuthError(
                f"message timestamp {skew_ms / 1000:+.1f} s from this host's clock, outside the "
                f"±{self._window_ms / 1000:g} s window (a replay, or clocks not synchronised)"
            )
        return body
