"""epd.config: every bad value names its EPD_* variable (the entry points turn it into exit 2)."""

from pathlib import Path

import pytest

from epd import config
from epd.service import advertised_host, connect_registry


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("EPD_")]:
        monkeypatch.delenv(key)


def load(cls=config.PrefillConfig, **env):
    return config.load(cls, **env)


def test_defaults_and_new_fields(model_dir):
    cfg = load(redis_url="redis://x:1/0", model=model_dir)
    assert (cfg.roles, cfg.admin_port, cfg.drain_timeout_s, cfg.drain_grace_s, cfg.redis_retry_s) == ("", 0, 30.0, 1.0,
                                                                                                     10.0)
    assert config.load(config.LauncherConfig).topology == ""


def test_environment_is_read(monkeypatch, model_dir):
    monkeypatch.setenv("EPD_REDIS_URL", "redis://r:6379/0")
    monkeypatch.setenv("EPD_MODEL", str(model_dir))
    monkeypatch.setenv("EPD_ROLES", "E,P")
    monkeypatch.setenv("EPD_ADMIN_PORT", "9000")
    cfg = load(config.EncoderConfig)
    assert (cfg.roles, cfg.admin_port, cfg.batch_invariant) == ("E,P", 9000, False)
    monkeypatch.setenv("EPD_BATCH_INVARIANT", "1")
    assert load(config.DecodeConfig).batch_invariant is True


@pytest.mark.parametrize("field, value, variable", [
    ("roles", "encoder,vision", "EPD_ROLES"),
    ("port", 70000, "EPD_PORT"),
    ("admin_port", -1, "EPD_ADMIN_PORT"),
    ("drain_timeout_s", 0, "EPD_DRAIN_TIMEOUT_S"),
    ("redis_retry_s", -1, "EPD_REDIS_RETRY_S"),
    ("device", "tpu", "EPD_DEVICE"),
])
def test_bad_value_names_the_variable(model_dir, field, value, variable):
    with pytest.raises(config.ConfigError, match=variable):
        load(redis_url="redis://x:1/0", model=model_dir, **{field: value})


def test_missing_model_directory_and_redis_url(tmp_path):
    with pytest.raises(config.ConfigError, match="EPD_MODEL: .*not a model directory"):
        load(redis_url="redis://x:1/0", model=tmp_path / "nope")
    with pytest.raises(config.ConfigError, match="EPD_REDIS_URL: Field required"):
        load(model=tmp_path)


def test_bad_topology_names_the_variable():
    with pytest.raises(config.ConfigError, match="EPD_TOPOLOGY: .*no decode"):
        config.load(config.LauncherConfig, topology="E-P")
    assert config.load(config.LauncherConfig, topology="(E-P)-D").topology == "(E-P)-D"


def test_unreachable_redis_after_retry_window():
    from tests.conftest import free_port

    with pytest.raises(config.ConfigError, match=r"EPD_REDIS_URL: .*unreachable.*EPD_REDIS_RETRY_S"):
        connect_registry(f"redis://127.0.0.1:{free_port()}/0", retry_s=0.3)


def test_advertised_host(model_dir):
    base = {"redis_url": "redis://x:1/0", "model": model_dir}
    assert advertised_host(load(**base, host="10.1.2.3")) == "10.1.2.3"
    assert advertised_host(load(**base, host="0.0.0.0", advertise_host="epd-1")) == "epd-1"
    assert advertised_host(load(**base, host="0.0.0.0")) not in ("", "0.0.0.0")  # this host's address


def test_dtype_auto_follows_the_hardware(model_dir, monkeypatch):
    from epd import hardware

    # a CPU with native bf16 GEMMs → bfloat16; without → float32; any accelerator → bfloat16
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    assert load(redis_url="redis://x:1/0", model=model_dir).dtype == "bfloat16"
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: ())
    assert load(redis_url="redis://x:1/0", model=model_dir).dtype == "float32"
    assert hardware.resolve_dtype("auto", "cuda:0")[0] == "bfloat16"
    assert load(redis_url="redis://x:1/0", model=model_dir, dtype="float32").dtype == "float32"
    name, why = hardware.resolve_dtype("bfloat16", "cpu")
    assert name == "bfloat16" and "slower than float32" in why  # it works, slowly, and says so


def test_unknown_dtype_lists_the_allowed_values(model_dir):
    with pytest.raises(config.ConfigError, match=r"EPD_DTYPE.*auto, float32, bfloat16, float16"):
        load(redis_url="redis://x:1/0", model=model_dir, dtype="fp8")
    with pytest.raises(config.ConfigError, match="EPD_DTYPE"):
        load(config.LauncherConfig, dtype="int4")
