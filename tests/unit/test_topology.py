"""epd.topology: the papers' E/P/D notation → processes (which roles share a process, which a device)."""

import pytest

from epd import config
from epd.launcher import service_commands
from epd.topology import from_counts, parse_roles, parse_topology


def shape(text: str) -> list[tuple[str, int]]:
    return [(p.name, p.device) for p in parse_topology(text).processes]


@pytest.mark.parametrize("text, expected", [
    ("E-P-D", [("E", 0), ("P", 1), ("D", 2)]),
    ("EP-D", [("EP", 0), ("D", 1)]),
    ("E-PD", [("E", 0), ("PD", 1)]),
    ("EPD", [("EPD", 0)]),
    ("(E-P)-D", [("E", 0), ("P", 0), ("D", 1)]),
    ("2E-1P-1D", [("E", 0), ("E", 1), ("P", 2), ("D", 3)]),
    ("2(E-P)-D", [("E", 0), ("P", 0), ("E", 1), ("P", 1), ("D", 2)]),
    ("(2E-P)-D", [("E", 0), ("E", 0), ("P", 0), ("D", 1)]),
    (" pe - d ", [("EP", 0), ("D", 1)]),  # case, order and spaces do not matter
    ("P-D", [("P", 0), ("D", 1)]),  # text-only serving needs no encoder
])
def test_parse_topology(text, expected):
    assert shape(text) == expected


def test_counts_per_role():
    topo = parse_topology("2E-EP-3D")
    assert (topo.count("encoder"), topo.count("prefill"), topo.count("decode")) == (3, 1, 3)
    assert topo.num_devices == 6
    assert parse_topology("(E-P)-D").num_devices == 2
    assert from_counts(2, 1, 1).notation == "2E-1P-1D"
    assert shape(from_counts(0, 1, 2).notation) == [("P", 0), ("D", 1), ("D", 2)]


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("E-P", "no decode"),
    ("E-D", "no prefill"),
    ("EE-P-D", "repeated"),
    ("E-X-D", "expected role letters"),
    ("0E-P-D", "at least 1"),
    ("(E-P-D", r"expected '-' or '\)'"),
    ("E--P-D", "expected role letters"),
    ("E-P-D)", "unexpected"),
    ("((E)-P)-D", "expected role letters"),
])
def test_bad_topology(text, why):
    with pytest.raises(ValueError, match=why):
        parse_topology(text)


@pytest.mark.parametrize("spec, roles", [
    ("encoder,prefill", ("encoder", "prefill")),
    ("prefill, decode", ("prefill", "decode")),
    ("E,P,D", ("encoder", "prefill", "decode")),
    ("EP", ("encoder", "prefill")),
    ("d,Encoder", ("encoder", "decode")),
    ("decode", ("decode",)),
])
def test_parse_roles(spec, roles):
    assert parse_roles(spec) == roles


@pytest.mark.parametrize("spec, why", [
    ("encoder,vision", "unknown role 'vision'"),
    ("", "no role"),
    ("E,encoder", "named twice"),
    ("gateway", "unknown role"),
])
def test_bad_roles(spec, why):
    with pytest.raises(ValueError, match=why):
        parse_roles(spec)


def test_launcher_commands_follow_the_topology(monkeypatch):
    for k in ("EPD_TOPOLOGY", "EPD_ENCODERS", "EPD_PREFILLS", "EPD_DECODES", "EPD_DEVICE"):
        monkeypatch.delenv(k, raising=False)
    cmds = service_commands(config.load(config.LauncherConfig, topology="EP-2D"))
    assert [(n, c.split()[-1], e.get("EPD_ROLES")) for n, c, e in cmds] == [
        ("ep-0", "services", "encoder,prefill"),
        ("decode-0", "services.decode", None),
        ("decode-1", "services.decode", None),
        ("gateway", "services.gateway", None),
    ]
    assert all("EPD_DEVICE" not in e for _, _, e in cmds)  # cpu: no device index
    cuda = service_commands(config.load(config.LauncherConfig, topology="(E-P)-D", device="cuda"))
    assert [e.get("EPD_DEVICE") for _, _, e in cuda] == ["cuda:0", "cuda:0", "cuda:1", None]
    counts = service_commands(config.load(config.LauncherConfig, encoders=2))  # no topology: E-P-D counts
    assert [n for n, _, _ in counts] == ["encoder-0", "encoder-1", "prefill-0", "decode-0", "gateway"]
