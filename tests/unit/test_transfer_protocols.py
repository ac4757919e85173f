"""EPD_TRANSFER_PROTOCOL and regions on the process device: names, what a Mooncake build offers,
the config errors that name the variable, the shm backend's host-only regions, `epd up`'s default."""

from __future__ import annotations

import pytest
import torch

from epd import config
from epd.transfer import TransferError, create_backend, protocols
from epd.transfer.protocols import BUILDS, MooncakeBuild, ProtocolError, check_protocol, engine_environment

CPU_BUILD, CUDA_BUILD, _, NPU_BUILD = BUILDS


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("EPD_")]:
        monkeypatch.delenv(key)


@pytest.fixture()
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.fixture()
def no_rdma(tmp_path):
    return str(tmp_path / "no-infiniband")  # does not exist: no RDMA device


@pytest.fixture()
def one_rdma(tmp_path):
    (tmp_path / "ib" / "mlx5_0").mkdir(parents=True)
    return str(tmp_path / "ib")


def test_unknown_protocol_lists_the_names():
    with pytest.raises(ProtocolError, match=r"^'hccl' is not one of tcp, rdma, ascend$"):
        check_protocol("hccl", build=CPU_BUILD)


def test_rdma_needs_an_rdma_device(no_rdma, one_rdma):
    with pytest.raises(ProtocolError, match=r"'rdma' is not available: this host has no RDMA device .*; "
                                            r"available: tcp$"):
        check_protocol("rdma", build=CPU_BUILD, sysfs=no_rdma)
    assert check_protocol("rdma", build=CPU_BUILD, sysfs=one_rdma) == "rdma"
    assert protocols.available_protocols(CPU_BUILD, one_rdma) == ["tcp", "rdma"]
    assert protocols.rdma_devices(one_rdma) == ["mlx5_0"]


def test_ascend_needs_the_ascend_build(no_rdma):
    with pytest.raises(ProtocolError, match="'ascend' is not available: the installed build "
                                            "mooncake-transfer-engine-non-cuda lacks it; available: tcp$"):
        check_protocol("ascend", build=CPU_BUILD, sysfs=no_rdma)
    assert check_protocol("ascend", "npu:0", build=NPU_BUILD, sysfs=no_rdma) == "ascend"
    with pytest.raises(ProtocolError, match="'rdma' is not available: the installed build "
                                            "mooncake-transfer-engine-npu lacks it; available: tcp, ascend$"):
        check_protocol("rdma", build=NPU_BUILD, sysfs=no_rdma)


def test_device_memory_needs_a_build_for_that_device(no_rdma):
    with pytest.raises(ProtocolError, match=r"EPD_DEVICE=cuda:1: .*non-cuda registers only cpu memory .*\[cuda\]"):
        check_protocol("tcp", "cuda:1", build=CPU_BUILD, sysfs=no_rdma)
    with pytest.raises(ProtocolError, match=r"EPD_DEVICE=npu: .*\[ascend\]"):
        check_protocol("tcp", "npu", build=CUDA_BUILD, sysfs=no_rdma)
    assert check_protocol("tcp", "cuda", build=CUDA_BUILD, sysfs=no_rdma) == "tcp"


def test_no_build_installed(monkeypatch):
    monkeypatch.setattr(protocols, "installed_build", lambda: None)
    with pytest.raises(ProtocolError, match=r"needs a Mooncake build and none is installed .*EPD_TRANSFER_BACKEND=shm"):
        check_protocol("tcp")
    assert protocols.available_protocols() == []


def test_installed_build_here_is_the_cpu_one():
    """This environment installs the `[cpu]` extra (scripts/setup.sh)."""
    assert protocols.installed_build() == CPU_BUILD
    assert "tcp" in protocols.available_protocols()


def test_engine_environment_forces_tcp_only_for_tcp():
    assert engine_environment("tcp") == {"MC_FORCE_TCP": "1"}
    assert engine_environment("rdma") == engine_environment("ascend") == {"MC_FORCE_TCP": None}


# -- configuration: one message naming the variable ------------------------------------------
@pytest.mark.parametrize("cls", [config.EncoderConfig, config.PrefillConfig, config.DecodeConfig,
                                 config.LauncherConfig])
def test_unknown_protocol_is_a_configuration_error(cls, model_dir):
    with pytest.raises(config.ConfigError) as err:
        config.load(cls, redis_url="redis://x:1/0", model=str(model_dir), transfer_protocol="infiniband")
    assert str(err.value) == "EPD_TRANSFER_PROTOCOL: 'infiniband' is not one of tcp, rdma, ascend"


def test_protocol_the_build_lacks_is_a_configuration_error(model_dir, monkeypatch):
    monkeypatch.setattr(protocols, "installed_build", lambda: CPU_BUILD)
    base = {"redis_url": "redis://x:1/0", "model": model_dir, "transfer_backend": "mooncake"}
    with pytest.raises(config.ConfigError, match=r"^EPD_TRANSFER_PROTOCOL: 'ascend' is not available: .*"
                                                 r"non-cuda lacks it; available: tcp"):
        config.load(config.EncoderConfig, **base, transfer_protocol="ascend")
    # the shm backend uses no protocol: only the name is checked
    cfg = config.load(config.EncoderConfig, **{**base, "transfer_backend": "shm"}, transfer_protocol="ascend")
    assert cfg.transfer_protocol == "ascend"
    assert config.load(config.DecodeConfig, **base).transfer_protocol == "tcp"


def test_shm_cannot_serve_a_device(model_dir, monkeypatch):
    monkeypatch.setattr(protocols, "installed_build", lambda: CUDA_BUILD)
    with pytest.raises(config.ConfigError, match=r"^EPD_TRANSFER_BACKEND: shm holds regions in host shared memory "
                                                 r"only; EPD_DEVICE=cuda:0 needs mooncake$"):
        config.load(config.PrefillConfig, redis_url="redis://x:1/0", model=model_dir, device="cuda:0",
                    transfer_backend="shm")
    with pytest.raises(config.ConfigError, match="EPD_TRANSFER_BACKEND: shm"):
        config.load(config.LauncherConfig, device="npu", transfer_backend="shm")


def test_epd_up_defaults_to_shm_on_cpu_and_mooncake_on_a_gpu(monkeypatch, model_dir):
    cfg = config.load(config.LauncherConfig)
    assert (cfg.transfer_backend, cfg.transfer_protocol) == ("shm", "tcp")
    assert config.load(config.LauncherConfig, transfer_backend="mooncake").transfer_backend == "mooncake"
    assert config.load(config.LauncherConfig, device="cuda").transfer_backend == "mooncake"
    # the services check that the build registers their device (each has its own cuda:N)
    monkeypatch.setattr(protocols, "installed_build", lambda: CPU_BUILD)
    with pytest.raises(config.ConfigError, match=r"EPD_TRANSFER_PROTOCOL: 'tcp' with EPD_DEVICE=cuda:1: .*\[cuda\]"):
        config.load(config.DecodeConfig, redis_url="redis://x:1/0", model=model_dir, device="cuda:1")


def test_epd_up_exits_2_on_an_unknown_protocol(monkeypatch, capsys):
    from epd.cli import main

    monkeypatch.setenv("EPD_TRANSFER_PROTOCOL", "ib")
    with pytest.raises(SystemExit) as done:
        main(["up"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err == "configuration error: EPD_TRANSFER_PROTOCOL: 'ib' is not one of tcp, rdma, ascend\n"


# -- regions on the process device -------------------------------------------------------------
def test_regions_default_to_the_process_device_and_shm_is_host_only():
    with create_backend("shm") as shm:
        region = shm.allocate(64, "host")
        assert region.device == torch.device("cpu") and region.tensor.device.type == "cpu"
        with pytest.raises(TransferError, match=r"host shared memory only, not on cuda:0; use EPD_TRANSFER_BACKEND="
                                                r"mooncake"):
            shm.allocate(64, "kv", device="cuda:0")


def test_mooncake_refuses_memory_its_build_cannot_register():
    with create_backend("mooncake") as mc:
        assert mc.allocate(64, "host").device.type == "cpu"
        if mc.build.devices == ("cpu",):
            with pytest.raises(TransferError, match=r"registers only cpu memory, not cuda:0"):
                mc.allocate(64, "kv", device="cuda:0")


def test_mooncake_backend_names_the_variable_for_a_protocol_it_cannot_run(monkeypatch):
    monkeypatch.setattr(protocols, "installed_build", lambda: MooncakeBuild("mooncake-x", ("cpu",), ("tcp",)))
    with pytest.raises(TransferError, match=r"^EPD_TRANSFER_PROTOCOL: 'rdma' is not available: the installed build "
                                            r"mooncake-x lacks it; available: tcp$"):
        create_backend("mooncake", protocol="rdma")
