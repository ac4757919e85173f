"""epd.wire.auth: cluster secret loading, key derivation, exposure check, MAC frames."""

from __future__ import annotations

import hashlib
import hmac
import struct
from types import SimpleNamespace

import pytest

from epd.config import ConfigError
from epd.wire import auth
from epd.wire.auth import AuthError, Signer, admin_token, check_exposure, derive_key, load_secret
from epd.wire.codec import WireError

SECRET = b"unit-test-cluster-secret-0123456789"
NOW_MS = 1_800_000_000_000


@pytest.fixture()
def clock(monkeypatch):
    """Freezes the module's wall clock at ``clock.ms`` (settable)."""
    state = SimpleNamespace(ms=NOW_MS)
    monkeypatch.setattr(auth, "time", SimpleNamespace(time_ns=lambda: state.ms * 1_000_000))
    return state


# -- load_secret ------------------------------------------------------------------------------
def test_load_secret_from_value_or_file(tmp_path):
    assert load_secret("", None) is None
    assert load_secret("  \n", None) is None
    assert load_secret(" 0123456789abcdef \n", None) == b"0123456789abcdef"
    path = tmp_path / "secret"
    path.write_bytes(b"  0123456789abcdef-from-file \nsecond line ignored\n")
    assert load_secret("", path) == b"0123456789abcdef-from-file"


@pytest.mark.parametrize(
    "content, variable",
    [
        (None, "EPD_CLUSTER_SECRET_FILE: cannot read"),
        (b"", "EPD_CLUSTER_SECRET_FILE: the first line"),
        (b"\n0123456789abcdef\n", "EPD_CLUSTER_SECRET_FILE: the first line"),
        (b"short\n", "EPD_CLUSTER_SECRET: the secret from EPD_CLUSTER_SECRET_FILE .* is 5 bytes"),
    ],
)
def test_load_secret_file_errors_name_the_variable(tmp_path, content, variable):
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=variable):
        load_secret("", path)


def test_load_secret_rejects_short_and_conflicting(tmp_path):
    with pytest.raises(ConfigError, match="^EPD_CLUSTER_SECRET: .* 15 bytes; use at least 16"):
        load_secret("0123456789abcde", None)
    path = tmp_path / "secret"
    path.write_text("0123456789abcdef")
    with pytest.raises(ConfigError, match="both set"):
        load_secret("0123456789abcdef", path)


# -- derive_key -------------------------------------------------------------------------------
def test_derive_key_is_hkdf_sha256_one_key_per_purpose():
    keys = {p: derive_key(SECRET, p) for p in auth.PURPOSES}
    assert len(set(keys.values())) == 3 and all(len(k) == 32 for k in keys.values())
    assert derive_key(SECRET, "wire") == keys["wire"]  # deterministic: every process derives the same
    assert derive_key(SECRET + b"x", "wire") != keys["wire"]
    # RFC 5869 with salt b"epd-serve cluster secret v1", info = purpose, L = 32 (pinned: a change
    # would split a deployment running two versions)
    prk = hmac.digest(b"epd-serve cluster secret v1", SECRET, "sha256")
    assert keys["admin"] == hmac.digest(prk, b"admin\x01", "sha256")
    assert admin_token(SECRET) == keys["admin"] and admin_token(None) is None
    with pytest.raises(ValueError):
        derive_key(b"", "wire")


# -- check_exposure ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST", "::ffff:127.0.0.1"]
)
def test_loopback_needs_no_secret(host):
    check_exposure(host, None, "EPD_HOST")


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "", "*", "10.0.0.7", "192.168.1.2", "epd-decode-0", "fe80::1", "128.0.0.1"]
)
def test_anything_else_needs_a_secret(host):
    with pytest.raises(ConfigError, match=r"^EPD_GATEWAY_HOST=.* not a loopback address: set EPD_CLUSTER_SECRET"):
        check_exposure(host, None, "EPD_GATEWAY_HOST")
    check_exposure(host, SECRET, "EPD_GATEWAY_HOST")


# -- Signer -----------------------------------------------------------------------------------
def test_disabled_signer_passes_frames_through():
    signer = Signer(None)
    frames = [b"envelope", b"blob"]
    assert not signer.enabled
    assert signer.sign(frames) is frames and signer.verify(frames) is frames


def test_mac_frame_layout(clock):
    signer = Signer(SECRET)
    frames = [b"envelope-bytes", b"", b"image"]
    signed = signer.sign(frames)
    assert signer.enabled and signed[:3] == frames and len(signed) == 4
    stamp = struct.pack(">Q", NOW_MS)
    body = stamp + b"".join(struct.pack(">Q", len(f)) + f for f in frames)
    assert signed[3] == stamp + hmac.digest(derive_key(SECRET, "wire"), body, hashlib.sha256)
    assert signer.verify(signed) == frames
    assert Signer(SECRET).verify([memoryview(f) for f in signed]) == frames  # zero-copy frames work too


def test_verify_rejects_forged_altered_and_unsigned(clock):
    signer = Signer(SECRET)
    signed = signer.sign([b"envelope", b"blob"])
    mac = signed[-1]
    forged = Signer(b"another-secret-0123456789").sign([b"envelope", b"blob"])
    cases = {
        "unsigned": [b"envelope", b"blob"],
        "nothing": [],
        "mac only": [mac],
        "short mac": [b"envelope", b"blob", mac[:-1]],
        "other secret": forged,
        "altered frame": [b"envelopf", b"blob", mac],
        "moved boundary": [b"envelopeb", b"lob", mac],
        "dropped frame": [b"envelope", mac],
        "altered stamp": [b"envelope", b"blob", struct.pack(">Q", NOW_MS + 1) + mac[8:]],
    }
    for name, frames in cases.items():
        with pytest.raises(AuthError):
            signer.verify(frames)
            pytest.fail(f"{name}: accepted")
    assert issubclass(AuthError, WireError)  # receivers that catch WireError drop these too


def test_timestamp_window(clock):
    signer = Signer(SECRET, window_s=60.0)
    signed = signer.sign([b"envelope"])
    for offset_ms in (-60_000, 0, 60_000):
        clock.ms = NOW_MS + offset_ms
        assert signer.verify(signed) == [b"envelope"]
    for offset_ms in (-60_001, 60_001, 3_600_000):
        clock.ms = NOW_MS + offset_ms
        with pytest.raises(AuthError, match="outside the ±60 s window"):
            signer.verify(signed)
