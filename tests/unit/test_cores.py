"""epd.cores: how ``epd up`` splits the machine's cores among the processes of a topology."""

import pytest

from epd import config
from epd.cores import ROLE_WEIGHTS, describe, split_cores
from epd.launcher import service_commands
from epd.topology import parse_topology

COMPUTE_ENV = ("EPD_TORCH_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def split(topology: str, cores: int) -> list[int]:
    return split_cores([p.roles for p in parse_topology(topology).processes], cores)


@pytest.fixture()
def launcher_env(monkeypatch):
    """A launcher config from a clean environment (no EPD_* deployment variables set)."""
    for k in ("EPD_TOPOLOGY", "EPD_ENCODERS", "EPD_PREFILLS", "EPD_DECODES", "EPD_DEVICE", "EPD_TORCH_THREADS"):
        monkeypatch.delenv(k, raising=False)
    return lambda **kw: config.load(config.LauncherConfig, **kw)


@pytest.mark.parametrize("topology, cores, expected", [
    # processes in notation order; fewer cores than processes: 1 each (oversubscribed)
    ("E-P-D", 2, [1, 1, 1]),
    ("E-P-D", 8, [4, 2, 2]),
    ("E-P-D", 16, [8, 4, 4]),
    ("EP-D", 2, [1, 1]),  # plain rounding would give round(1.5) + 1 = 3 threads on 2 cores
    ("EP-D", 8, [6, 2]),
    ("EP-D", 16, [12, 4]),
    ("(E-P)-D", 2, [1, 1, 1]),  # a ( … ) group's members are separate processes: same as E-P-D
    ("(E-P)-D", 8, [4, 2, 2]),
    ("(E-P)-D", 16, [8, 4, 4]),
    ("EPD", 2, [2]),
    ("EPD", 8, [8]),
    ("EPD", 16, [16]),
    ("2E-1P-1D", 2, [1, 1, 1, 1]),
    ("2E-1P-1D", 8, [3, 3, 1, 1]),
    ("2E-1P-1D", 16, [5, 5, 3, 3]),  # quotas 5⅓, 5⅓, 2⅔, 2⅔: the two spare cores to the ⅔s
    ("E-P-D", 4, [2, 1, 1]),
    ("E-P-D", 3, [1, 1, 1]),
    ("E-P-D", 1, [1, 1, 1]),
    ("E-PD", 2, [1, 1]),
    ("E-PD", 5, [3, 2]),  # quotas 2.5, 2.5, equal weights (E 2, PD 1 + 1): the spare core to the earlier one
    ("EP-D", 5, [4, 1]),  # quotas 3.75, 1.25
    ("P-D", 3, [2, 1]),  # quotas 1.5, 1.5
    ("PD-E", 5, [3, 2]),  # the same tie as E-PD on 5: the earlier process again
    ("4E-P-D", 4, [1, 1, 1, 1, 1, 1]),
    ("4E-P-D", 8, [2, 2, 1, 1, 1, 1]),  # quotas E 1.6, P and D 0.8 → P, D get 1; 6 left for 4 Es: 1.5 each
])
def test_split(topology, cores, expected):
    assert split(topology, cores) == expected


@pytest.mark.parametrize("topology", ["E-P-D", "EP-D", "(E-P)-D", "EPD", "2E-1P-1D", "E-PD", "3E-2(P-D)-4D"])
@pytest.mark.parametrize("cores", range(1, 33))
def test_every_process_gets_a_core_and_no_more_than_the_machine(topology, cores):
    threads = split(topology, cores)
    assert len(threads) == len(parse_topology(topology).processes)
    assert min(threads) >= 1
    # with at least as many cores as processes the split uses exactly the cores; otherwise 1 each
    assert sum(threads) == max(cores, len(threads))


def test_weights_and_bad_input():
    assert ROLE_WEIGHTS == {"encoder": 2, "prefill": 1, "decode": 1}
    assert split_cores([], 4) == []
    with pytest.raises(ValueError, match="at least 1"):
        split_cores([("decode",)], 0)
    with pytest.raises(KeyError):
        split_cores([("gateway",)], 4)


def test_describe():
    three = [("encoder-0", 1), ("prefill-0", 1), ("decode-0", 1)]
    assert describe(2, three) == (
        "cores: 2 → encoder-0 1, prefill-0 1, decode-0 1 (3 threads on 2 cores: ≥ 1 each; EPD_TORCH_THREADS overrides)"
    )
    assert describe(8, [("ep-0", 6), ("decode-0", 2)]) == "cores: 8 → ep-0 6, decode-0 2 (EPD_TORCH_THREADS overrides)"
    assert describe(2, [("ep-0", 1), ("decode-0", 1)], override=1) == (
        "cores: 2 → ep-0 1, decode-0 1 (EPD_TORCH_THREADS=1 for every process)"
    )
    assert describe(2, [(name, 2) for name, _ in three], override=2) == (
        "cores: 2 → encoder-0 2, prefill-0 2, decode-0 2 (EPD_TORCH_THREADS=2 for every process: 6 threads on 2 cores)"
    )


def test_each_process_gets_its_share_in_its_env(launcher_env):
    cmds = service_commands(launcher_env(topology="2E-1P-1D"), cores=16)
    assert [(n, *(e.get(k) for k in COMPUTE_ENV)) for n, _, e in cmds] == [
        ("encoder-0", "5", "5", "5"),
        ("encoder-1", "5", "5", "5"),
        ("prefill-0", "3", "3", "3"),
        ("decode-0", "3", "3", "3"),
        ("gateway", None, None, None),  # not a torch compute process: no share
    ]
    ep = service_commands(launcher_env(topology="EP-D"), cores=2)
    assert [(n, e["EPD_ROLES"] if "EPD_ROLES" in e else "", e["EPD_TORCH_THREADS"]) for n, _, e in ep[:-1]] == [
        ("ep-0", "encoder,prefill", "1"), ("decode-0", "", "1"),
    ]


def test_split_applies_on_accelerators_too(launcher_env):
    cmds = service_commands(launcher_env(topology="(E-P)-D", device="cuda"), cores=8)
    assert [(e.get("EPD_DEVICE"), e.get("EPD_TORCH_THREADS")) for _, _, e in cmds] == [
        ("cuda:0", "4"), ("cuda:0", "2"), ("cuda:1", "2"), (None, None),
    ]


def test_user_torch_threads_override_the_split(launcher_env, monkeypatch):
    monkeypatch.setenv("EPD_TORCH_THREADS", "3")
    cmds = service_commands(launcher_env(topology="E-P-D"), cores=16)
    assert [tuple(e.get(k) for k in COMPUTE_ENV) for _, _, e in cmds[:-1]] == [("3", "3", "3")] * 3
    cmds = service_commands(launcher_env(topology="EPD", torch_threads=1), cores=16)
    assert cmds[0][2]["EPD_TORCH_THREADS"] == "1"


def test_interop_threads_config(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("EPD_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("EPD_MODEL", str(tmp_path))
    monkeypatch.delenv("EPD_TORCH_INTEROP_THREADS", raising=False)
    assert config.load(config.CommonConfig).torch_interop_threads == 1
    monkeypatch.setenv("EPD_TORCH_INTEROP_THREADS", "4")
    assert config.load(config.DecodeConfig).torch_interop_threads == 4
    monkeypatch.setenv("EPD_TORCH_INTEROP_THREADS", "-1")
    with pytest.raises(config.ConfigError, match="EPD_TORCH_INTEROP_THREADS"):
        config.load(config.CommonConfig)


def test_interop_threads_guard(monkeypatch, caplog):
    """torch refuses a second set_num_interop_threads (or one after its pool started): warn, keep its."""
    import torch

    from epd import device

    calls = []
    pool = {"size": 4}

    def set_interop(n):
        calls.append(n)
        if len(calls) > 1:
            raise RuntimeError("Error: cannot set number of interop threads after parallel work has started")
        pool["size"] = n

    monkeypatch.setattr(torch, "set_num_interop_threads", set_interop)
    monkeypatch.setattr(torch, "get_num_interop_threads", lambda: pool["size"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert device.set_threads(0, 1)[1] == 1
    assert device.set_threads(0, 1)[1] == 1 and calls == [1]  # already in place: not asked again
    assert device.set_threads(0, 2)[1] == 1 and calls == [1, 2]  # refused: kept, with a warning
    assert "EPD_TORCH_INTEROP_THREADS=2 not applied" in caplog.text
    assert device.set_threads(0, 0)[1] == 1 and calls == [1, 2]  # 0: torch's default, nothing set
