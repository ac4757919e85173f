"""Can peers reach an instance at the address it advertises? (DESIGN.md §9; issue #12)

An instance that advertises an address its peers cannot reach (a wrong ``EPD_ADVERTISE_HOST``,
an address on an interface other hosts have no route to, a firewall) still registers and beats.
Unchecked, the gateway routes to it, pays ``EPD_SEND_TIMEOUT_S`` on the send, suspects it for a
while, and comes back to it later; the instance itself never learns why it gets no work. So
every process that heartbeats also runs a :class:`ReachWatch` (started by
:class:`epd.registry.registry.Heartbeat`):

- it probes the ZeroMQ inbox of every other registered instance: a TCP connect to the
  advertised ``host:port`` within :data:`PROBE_TIMEOUT_S`, once per incarnation when it works,
  every heartbeat period while it fails;
- after :data:`FAILURES_TO_REPORT` failures in a row it puts a :class:`Report` in the registry
  (hash ``{prefix}:unreach``, field ``<target>|<prober>``, signed like every entry when there is
  a cluster secret), renews it each period while the probe keeps failing, deletes it once the
  probe succeeds; a report not renewed is ignored after ``until_ms`` (its write time + the TTL);
- the reported instance logs a WARNING naming each peer that could not reach it and the address
  that peer tried, and an INFO line when the report is gone;
- :meth:`epd.registry.registry.Registry.instances` leaves out an incarnation with a live report,
  so gateways do not route to it and stages treat it as missing (what they pinned to it fails
  over after the usual grace).

A prober that reaches none of two or more peers in a round, and has reached none before,
suspects its own network: it logs an ERROR and reports nothing, so one broken host cannot hide
every other. Only the inbox is probed: a firewall that passes the ZeroMQ port but not the
transfer engine's ports is not seen here (those transfers fail per request and are retried).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # registry.py imports this module; no import back at run time
    from epd.registry.registry import InstanceInfo, Registry

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0  # a TCP handshake across a LAN takes well under a millisecond
FAILURES_TO_REPORT = 2  # consecutive failed probes before a report


@dataclass(frozen=True)
class Report:
    """``prober`` could not reach incarnation ``incarnation`` of ``target`` at ``address``."""

    target: str
    incarnation: str
    prober: str
    address: str
    error: str
    until_ms: int  # unix ms after which the report no longer counts unless renewed


def inbox_endpoint(inbox: str) -> tuple[str, int] | None:
    """``tcp://host:port`` (``tcp://[v6]:port``) → ``(host, port)``; ``None`` for anything else."""
    if not inbox.startswith("tcp://"):
        return None
    host, _, port = inbox[len("tcp://"):].rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def probe(endpoints: dict, timeout_s: float) -> dict:
    """TCP-connect to every ``(host, port)`` of ``endpoints`` at once and close again.

    Returns:
        The same keys → ``None`` when the connection was accepted, else why not
        (``strerror`` of the failure, or no answer within ``timeout_s``).
    """
    result: dict = {}
    sel = selectors.DefaultSelector()
    try:
        for key, (host, port) in endpoints.items():
            try:
                family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                result[key] = f"cannot resolve or open a socket: {exc}"
                continue
            sock.setblocking(False)
            err = sock.connect_ex(addr)
            if err in (0, errno.EINPROGRESS):
                sel.register(sock, selectors.EVENT_WRITE, key)
            else:
                result[key] = os.strerror(err)
                sock.close()
        deadline = time.monotonic() + timeout_s
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for sk, _ in sel.select(left):
                err = sk.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                result[sk.data] = os.strerror(err) if err else None
                sel.unregister(sk.fileobj)
                sk.fileobj.close()
        for sk in list(sel.get_map().values()):
            result[sk.data] = f"no answer within {timeout_s:g} s"
            sel.unregister(sk.fileobj)
            sk.fileobj.close()
    finally:
        sel.close()
    return result


class ReachWatch(threading.Thread):
    """Probes the other instances' advertised inboxes, reports those it cannot reach, and logs
    the reports about its own instance (module docstring).

    Args:
        registry: where instances are listed and reports kept.
        info: this instance's entry (id, incarnation).
        period_s: seconds between rounds (the heartbeat period).
        ttl_s: how long a report counts unless renewed (the instance TTL).
        timeout_s: deadline of one round of probes.
    """

    def __init__(self, registry: Registry, info: InstanceInfo, period_s: float, ttl_s: float,
                 timeout_s: float = PROBE_TIMEOUT_S) -> None:
        super().__init__(name=f"reach-{info.instance_id}", daemon=True)
        self.registry, self.info = registry, info
        self.period_s, self.ttl_s, self.timeout_s = period_s, ttl_s, timeout_s
        self._reached: set[tuple[str, str, str]] = set()  # (id, incarnation, inbox) connected once
        self._failures: dict[tuple[str, str, str], int] = {}
        self._reported: set[tuple[str, str, str]] = set()
        self._heard: dict[str, Report] = {}  # prober -> report about this instance, already logged
        self._suspect_self = False
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            try:
                self.tick()
            except Exception as exc:  # a Redis blip: try again next period
                logger.debug("instance %s: reachability round failed: %s", self.info.instance_id, exc)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=self.timeout_s + self.period_s + 1)

    def tick(self) -> None:
        """One round: probe the peers not reached yet, report or clear, log reports about us.

        Raises:
            RegistryError: Redis unreachable.
        """
        me = self.info.instance_id
        peers = {(i.instance_id, i.incarnation, i.inbox): i
                 for i in self.registry.instances(reachable_only=False) if i.instance_id != me}
        self._reached &= peers.keys()
        self._failures = {k: n for k, n in self._failures.items() if k in peers}
        self._reported &= peers.keys()  # a report on a vanished incarnation expires by itself
        todo = {k: ep for k in peers if k not in self._reached and (ep := inbox_endpoint(k[2])) is not None}
        if todo:
            self._settle(probe(todo, self.timeout_s))
        self._read_reports()

    def _settle(self, results: dict[tuple[str, str, str], str | None]) -> None:
        me = self.info.instance_id
        failed = {k: why for k, why in results.items() if why is not None}
        for key in results.keys() - failed.keys():
            self._reached.add(key)
            self._failures.pop(key, None)
            if key in self._reported:
                self._reported.discard(key)
                self.registry.delete_unreachable(key[0], me)
                logger.info("instance %s reaches %s at %s again; report withdrawn", me, key[0], key[2])
        if len(failed) >= 2 and len(failed) == len(results) and not self._reached:
            if not self._suspect_self:
                logger.error("instance %s reaches none of its %d peers (%s): its own network is the likely "
                             "fault, so it reports none of them", me, len(failed),
                             ", ".join(f"{k[0]} at {k[2]}: {why}" for k, why in sorted(failed.items())))
            self._suspect_self = True
            return
        self._suspect_self = False
        until_ms = time.time_ns() // 1_000_000 + int(self.ttl_s * 1000)
        for key, why in failed.items():
            self._failures[key] = self._failures.get(key, 0) + 1
            if self._failures[key] < FAILURES_TO_REPORT:
                continue
            self.registry.put_unreachable(Report(key[0], key[1], me, key[2], why, until_ms), self.ttl_s)
            if key not in self._reported:
                self._reported.add(key)
                logger.warning("instance %s cannot reach %s at its advertised inbox %s (%s); reported, so it "
                               "is left out of routing until it is reachable", me, key[0], key[2], why)

    def _read_reports(self) -> None:
        me, inc = self.info.instance_id, self.info.incarnation
        about_me = {r.prober: r for r in self.registry.unreachable() if r.target == me and r.incarnation == inc}
        for prober, r in sorted(about_me.items()):
            if prober not in self._heard:
                logger.warning("instance %s: peer %s could not reach it at %s (%s); it is left out of routing "
                               "until that peer can (check EPD_ADVERTISE_HOST / EPD_HOST, routes, firewalls)",
                               me, prober, r.address, r.error)
        for prober in sorted(self._heard.keys() - about_me.keys()):
            logger.info("instance %s: peer %s no longer reports it unreachable", me, prober)
        self._heard = about_me
