"""Hosts made of Linux network namespaces on one bridge, for the cross-host tests.

Topology (``tag`` makes every name unique to this test process)::

    root namespace (the client: pytest, the HF reference)
      epdmh<pid>c 10.N.M.1/24 ──┐
                                │ veth
    ns epdmh<tag>s: bridge br0 (the "switch")
                                │ veth: v<i> in the switch, eth0 in the host
    ns epdmh<tag>h<i>: lo up, eth0 10.N.M.<octet>/24  (one per host)

Each host is a namespace with its own loopback and one NIC (``eth0``); every byte a host
sends to another crosses its ``eth0`` and the bridge, so ``eth0``'s rx/tx counters measure a
host's traffic. :meth:`Topology.link_down` cuts a host's NIC (``ip link set eth0 down`` in
it): its processes keep running, nobody reaches them and they reach nobody.

Needs root and iproute2 (``ip netns``, veth, bridge). :func:`why_unavailable` says why not.
Nothing outside the namespaces is touched except the client leg ``epdmh<pid>c`` in the root
namespace (a /24 no root route overlaps); :meth:`Topology.destroy` removes everything and is
safe to call twice or after a partial :meth:`Topology.create`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

PREFIX = "epdmh"  # every namespace and root-namespace link this module creates starts with it


def _quiet_ipv6(netns: str | None, device: str = "all") -> None:
    """Turn IPv6 off (no router solicitations or MLD reports in the byte counters)."""
    argv = ["sysctl", "-qw", f"net.ipv6.conf.{device}.disable_ipv6=1"]
    subprocess.run(["ip", "netns", "exec", netns, *argv] if netns else argv, capture_output=True, timeout=20)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def why_unavailable() -> str | None:
    """``None`` when namespaces can be made here, else the reason (for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return "needs root (ip netns add, veth pairs, a bridge)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    probe = f"{PREFIX}{os.getpid()}probe"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    try:
        made = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if made.returncode != 0:
            return f"cannot make a bridge in a namespace: {made.stderr.strip()}"
        made = _ip("-n", probe, "link", "add", "name", "a", "type", "veth", "peer", "name", "b", check=False)
        if made.returncode != 0:
            return f"cannot make a veth pair: {made.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def remove_stale() -> None:
    """Delete namespaces and root links an earlier run of these tests left behind (its pid is gone)."""
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]
    links = [link["ifname"] for link in json.loads(_ip("-j", "link", "show").stdout or "[]")]
    for name in names + links:
        if not name.startswith(PREFIX):
            continue
        pid = re.match(r"\d+", name[len(PREFIX):])
        if pid and not os.path.exists(f"/proc/{pid.group()}"):
            if name in names:
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that no route or address of the root namespace overlaps."""
    used = []
    for row in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = row.get("dst", "")
        if dst and dst != "default":
            try:
                used.append(ipaddress.ip_network(dst, strict=False))
            except ValueError:
                continue
    for link in json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]"):
        for a in link.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    start = os.getpid() % 200
    for k in range(200):
        net = ipaddress.ip_network(f"10.{203 + (start + k) // 250 % 40}.{(start + k) % 250 + 1}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the test network")


@dataclass
class Host:
    """One namespace host: its namespace, address and the switch-side end of its cable."""

    name: str
    netns: str
    address: str
    switch_port: str


@dataclass
class Topology:
    """A switch namespace with a bridge, hosts on it, and a client leg in the root namespace.

    Args:
        hosts: host name → last octet of its address (2..254).
    """

    hosts_wanted: dict[str, int]
    tag: str = field(default_factory=lambda: f"{os.getpid()}x{os.urandom(2).hex()}")
    hosts: dict[str, Host] = field(default_factory=dict)
    subnet: ipaddress.IPv4Network | None = None
    client_address: str = ""

    @property
    def switch(self) -> str:
        return f"{PREFIX}{self.tag}s"

    @property
    def client_link(self) -> str:
        return f"{PREFIX}{os.getpid()}c"

    def create(self) -> Topology:
        remove_stale()
        self.subnet = _free_subnet()
        base = str(self.subnet.network_address).rsplit(".", 1)[0]
        _ip("netns", "add", self.switch)
        _quiet_ipv6(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")
        for i, (name, octet) in enumerate(self.hosts_wanted.items()):
            host = Host(name, f"{PREFIX}{self.tag}h{i}", f"{base}.{octet}", f"v{i}")
            self.hosts[name] = host
            _ip("netns", "add", host.netns)
            _quiet_ipv6(host.netns)
            _ip("link", "add", host.switch_port, "netns", self.switch, "type", "veth",
                "peer", "name", "eth0", "netns", host.netns)
            _ip("-n", self.switch, "link", "set", host.switch_port, "master", "br0")
            _ip("-n", self.switch, "link", "set", host.switch_port, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        self.client_address = f"{base}.1"
        _ip("link", "add", self.client_link, "type", "veth", "peer", "name", "vc", "netns", self.switch)
        _quiet_ipv6(None, self.client_link)
        _ip("-n", self.switch, "link", "set", "vc", "master", "br0")
        _ip("-n", self.switch, "link", "set", "vc", "up")
        _ip("addr", "add", f"{self.client_address}/24", "dev", self.client_link)
        _ip("link", "set", self.client_link, "up")
        return self

    def destroy(self) -> None:
        """Delete every namespace and the client leg (their veths go with them). Kill the
        processes inside first: a namespace lives on while a process is in it."""
        _ip("link", "del", self.client_link, check=False)
        for host in self.hosts.values():
            _ip("netns", "del", host.netns, check=False)
        _ip("netns", "del", self.switch, check=False)

    # -- use ---------------------------------------------------------------------------
    def exec_prefix(self, host: str) -> list[str]:
        """Argv prefix that runs a command inside ``host`` (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.hosts[host].netns]

    def run_in(self, host: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.exec_prefix(host), *argv], capture_output=True, text=True,
                              check=check, timeout=30)

    def counters(self, host: str) -> tuple[int, int]:
        """``(rx_bytes, tx_bytes)`` of ``host``'s NIC (eth0, host side), from the kernel."""
        [link] = json.loads(_ip("-n", self.hosts[host].netns, "-j", "-s", "link", "show", "dev", "eth0").stdout)
        return int(link["stats64"]["rx"]["bytes"]), int(link["stats64"]["tx"]["bytes"])

    def all_counters(self) -> dict[str, tuple[int, int]]:
        return {name: self.counters(name) for name in self.hosts}

    def link_down(self, host: str) -> None:
        _ip("-n", self.hosts[host].netns, "link", "set", "eth0", "down")

    def link_up(self, host: str) -> None:
        _ip("-n", self.hosts[host].netns, "link", "set", "eth0", "up")

    def add_address(self, host: str, cidr: str, device: str = "lo") -> None:
        """Give ``host`` another address (on ``lo`` by default: reachable only from inside it)."""
        _ip("-n", self.hosts[host].netns, "addr", "add", cidr, "dev", device)

    def listeners(self, host: str) -> str:
        """``ss -ltnH`` inside ``host``: its listening TCP sockets (address%device:port)."""
        return self.run_in(host, "ss", "-ltnH").stdout
