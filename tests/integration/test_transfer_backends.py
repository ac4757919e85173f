"""Both transfer backends against real peers: in this process and in a spawned process.

Each backend is exercised the way services use it: one side allocates a region and hands
out its handle, the other writes into or reads from it with batched segments.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import socket
import stat
import subprocess

import pytest
import torch

from epd.transfer import (
    TransferBackend,
    TransferError,
    TransferState,
    cleanup_stale_segments,
    create_backend,
)
from epd.transfer.shm import SHM_DIR
from epd.transfer.shm import parse_handle as parse_shm

KINDS = ["shm", "mooncake"]
PEER_BYTES = 4096


def _peer_main(kind: str, conn) -> None:
    """Peer process: owns one region, answers ``fill``/``dump``/``exit`` over a pipe."""
    backend = create_backend(kind, timeout_s=2.0)
    region = backend.allocate(PEER_BYTES, "peer")
    conn.send(region.handle)
    while True:
        cmd, arg = conn.recv()
        if cmd == "fill":
            region.tensor[: len(arg)] = torch.frombuffer(bytearray(arg), dtype=torch.uint8)
            conn.send("ok")
        elif cmd == "dump":
            conn.send(region.tensor.numpy().tobytes())
        elif cmd == "exit":
            backend.close()
            conn.send("bye")
            return


class Peer:
    """A backend owning one region in a spawned process."""

    def __init__(self, kind: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer_main, args=(kind, child), daemon=True)
        self.proc.start()
        assert self.conn.poll(60), "peer process did not start"
        self.handle: str = self.conn.recv()

    def call(self, cmd: str, arg: object = None) -> object:
        self.conn.send((cmd, arg))
        assert self.conn.poll(30), f"peer process did not answer {cmd}"
        return self.conn.recv()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(30)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.call("exit")
            self.proc.join(30)


@pytest.fixture(params=KINDS)
def pair(request):
    """Two backends of one kind in this process: ``(sender, receiver)``."""
    a = create_backend(request.param, timeout_s=2.0)
    b = create_backend(request.param, timeout_s=2.0)
    yield a, b
    a.close()
    b.close()


@pytest.fixture(params=KINDS)
def peer(request):
    p = Peer(request.param)
    local = create_backend(request.param, timeout_s=2.0)
    yield local, p
    p.stop()
    local.close()


def _pattern(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# -- across processes ---------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_write_and_read_with_peer_process(peer):
    local, p = peer
    region = local.allocate(PEER_BYTES, "local")
    region.tensor.copy_(_pattern(PEER_BYTES))
    local.write(region, p.handle, [0, 1024], [512, 3000], [256, 96])
    seen = torch.frombuffer(bytearray(p.call("dump")), dtype=torch.uint8)
    expected = torch.zeros(PEER_BYTES, dtype=torch.uint8)
    expected[512:768] = region.tensor[0:256]
    expected[3000:3096] = region.tensor[1024:1120]
    assert torch.equal(seen, expected)

    p.call("fill", bytes(range(200)))
    back = local.allocate(PEER_BYTES, "back")
    local.read(back, p.handle, [100], [0], [200])
    assert back.tensor[100:300].tolist() == list(range(200))
    assert int(back.tensor[:100].sum()) == 0 and int(back.tensor[300:].sum()) == 0
    assert (local.stats.bytes_written, local.stats.bytes_read, local.stats.transfers) == (352, 200, 2)


@pytest.mark.timeout(120)
def test_killed_peer_process_is_an_error_not_a_hang(peer):
    local, p = peer
    region = local.allocate(64)
    local.write(region, p.handle, [0], [0], [64])
    p.kill()
    with pytest.raises(TransferError):
        local.write(region, p.handle, [0], [0], [64])
    fut = local.read_async(region, p.handle, [0], [0], [64])
    with pytest.raises(TransferError):
        fut.wait()
    assert fut.state is TransferState.FAILED
    if p.handle.startswith("shm://"):  # the crashed owner's segment is left behind until cleaned
        name = parse_shm(p.handle)[0]
        assert name in cleanup_stale_segments()
        assert not os.path.exists(os.path.join(SHM_DIR, name))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_mooncake_unresponsive_peer_times_out():
    """A stopped (SIGSTOP) peer never answers; the library would block for its own timeout."""
    p = Peer("mooncake")
    local = create_backend("mooncake", timeout_s=1.0)
    try:
        region = local.allocate(64)
        local.write(region, p.handle, [0], [0], [64])
        os.kill(p.proc.pid, signal.SIGSTOP)
        with pytest.raises(TransferError, match="not done"):
            local.write(region, p.handle, [0], [0], [64])
        fut = local.write_async(region, p.handle, [0], [0], [64])
        with pytest.raises(TransferError):
            fut.wait()
        assert fut.state is TransferState.FAILED
    finally:
        p.kill()
        local.close()  # waits for the library's own timeout on the stuck calls, then frees
    assert local.stats.failures == 2


# -- in one process --------------------------------------------------------------------------
def test_batched_multi_segment_write(pair):
    a, b = pair
    src = a.allocate(256, "src")
    dst = b.allocate(256, "dst")
    src.tensor.copy_(_pattern(256, seed=1))
    local_offsets, remote_offsets, lengths = [0, 16, 100, 200], [240, 0, 50, 128], [16, 8, 30, 1]
    a.write(src, dst.handle, local_offsets, remote_offsets, lengths)
    expected = torch.zeros(256, dtype=torch.uint8)
    for lo, ro, n in zip(local_offsets, remote_offsets, lengths, strict=True):
        expected[ro : ro + n] = src.tensor[lo : lo + n]
    assert torch.equal(dst.tensor, expected)
    assert (a.stats.bytes_written, a.stats.transfers, a.stats.failures) == (55, 1, 0)


def test_many_segments_in_one_batch(pair):
    """More segments than mooncake accepts per call (it is chunked); every other 2-byte pair."""
    a, b = pair
    n = 1500
    src = a.allocate(4 * n)
    dst = b.allocate(4 * n)
    src.tensor.copy_(_pattern(4 * n, seed=3))
    offsets = [4 * i for i in range(n)]
    a.write(src, dst.handle, offsets, offsets, [2] * n)
    view = dst.tensor.view(n, 4)
    assert torch.equal(view[:, :2], src.tensor.view(n, 4)[:, :2])
    assert int(view[:, 2:].sum()) == 0
    assert a.stats.bytes_written == 2 * n


def test_async_write_wait_and_state(pair):
    a, b = pair
    src = a.allocate(1 << 20)
    dst = b.allocate(1 << 20)
    src.tensor.copy_(_pattern(1 << 20, seed=2))
    fut = a.write_async(src, dst.handle, [0], [0], [1 << 20])
    assert fut.nbytes == 1 << 20
    fut.wait()
    assert fut.state is TransferState.SUCCESS and fut.done() and fut.elapsed_s >= 0
    assert torch.equal(dst.tensor, src.tensor)
    back = b.allocate(1 << 20)
    rfut = b.read_async(back, dst.handle, [0], [0], [1 << 20])  # a region of one's own
    rfut.wait()
    assert torch.equal(back.tensor, src.tensor)


@pytest.mark.parametrize(
    "local_offsets,remote_offsets,lengths",
    [
        ([0, 60], [0, 8], [8, 8]),  # second local segment ends at 68 > 64
        ([0, 8], [0, 125], [8, 8]),  # second remote segment ends at 133 > 128
        ([0], [0], [65]),  # longer than the local region
    ],
)
def test_out_of_bounds_moves_no_bytes(pair, local_offsets, remote_offsets, lengths):
    a, b = pair
    src = a.allocate(64)
    dst = b.allocate(128)
    src.tensor.fill_(7)
    with pytest.raises(TransferError, match="outside"):
        a.write(src, dst.handle, local_offsets, remote_offsets, lengths)
    with pytest.raises(TransferError, match="outside"):
        a.read_async(src, dst.handle, local_offsets, remote_offsets, lengths)
    assert int(dst.tensor.sum()) == 0 and int(src.tensor.sum()) == 7 * 64
    assert a.stats.transfers == 0


def test_bad_handle_is_an_error(pair):
    a, _ = pair
    src = a.allocate(64)
    other = "shm://epd-1-0/1/64" if a.kind == "mooncake" else "mooncake://127.0.0.1:1/10/64"
    for handle in (other, "garbage"):
        with pytest.raises(TransferError):
            a.write(src, handle, [0], [0], [8])


def test_closed_peer_is_an_error(pair):
    a, b = pair
    src = a.allocate(64)
    dst = b.allocate(64)
    a.write(src, dst.handle, [0], [0], [64])
    b.close()
    with pytest.raises(TransferError):
        a.write(src, dst.handle, [0], [0], [64])
    with pytest.raises(TransferError):
        a.read(src, dst.handle, [0], [0], [64])


def test_freed_region_is_an_error(pair):
    a, b = pair
    src = a.allocate(64)
    dst = b.allocate(64)
    b.free(dst)
    b.free(dst)  # idempotent
    with pytest.raises(TransferError):
        a.write(src, dst.handle, [0], [0], [64])


def test_close_is_idempotent_and_final(pair):
    a, _ = pair
    region = a.allocate(64)
    a.close()
    a.close()
    with pytest.raises(TransferError, match="closed"):
        a.allocate(64)
    with pytest.raises(TransferError, match="closed"):
        a.write(region, region.handle, [0], [0], [1])
    if region.handle.startswith("shm://"):
        assert not os.path.exists(os.path.join(SHM_DIR, parse_shm(region.handle)[0]))


@pytest.mark.parametrize("kind", KINDS)
def test_context_manager_closes(kind):
    with create_backend(kind) as backend:
        assert isinstance(backend, TransferBackend)
        region = backend.allocate(16, "ctx")
        region.tensor.view(torch.float32)[:] = 1.5
    with pytest.raises(TransferError):
        backend.allocate(16)
    assert region.tensor.view(torch.float32).tolist() == [1.5] * 4  # memory outlives close


# -- exposure ----------------------------------------------------------------------------------
def test_shm_segments_are_owner_only():
    old = os.umask(0)  # the widest umask: the mode must not depend on it
    try:
        with create_backend("shm") as backend:
            region = backend.allocate(64, "mode")
            mode = os.stat(os.path.join(SHM_DIR, parse_shm(region.handle)[0])).st_mode
    finally:
        os.umask(old)
    assert stat.S_IMODE(mode) == 0o600


def _own_address() -> str:
    """A non-loopback address of this host (the one a default route leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routes, sends nothing
        except OSError:
            pytest.skip("no non-loopback IPv4 route on this host")
        address = s.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("no non-loopback IPv4 address on this host")
    return address


def _connects(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


def test_mooncake_listens_only_on_loopback_for_a_loopback_host():
    """The library binds 0.0.0.0 / [::] whatever host it is given; the backend confines both of
    its listeners to the loopback interface (SO_BINDTODEVICE lo). Checked by connecting through a
    non-loopback address of this host, which reaches a plain 0.0.0.0 listener but not the engine."""
    other = _own_address()
    with create_backend("mooncake", host="127.0.0.1") as backend, socket.create_server(("0.0.0.0", 0)) as control:
        rpc_port = int(backend.endpoint.rsplit(":", 1)[1])
        assert backend.listen_device == "lo"
        assert rpc_port in backend.listen_ports and len(backend.listen_ports) == 2  # handshake + data port
        assert _connects(other, control.getsockname()[1])  # the address is reachable ...
        for port in backend.listen_ports:
            assert _connects("127.0.0.1", port)
            assert not _connects(other, port), f"engine port {port} accepts connections on {other}"


def test_mooncake_ss_shows_the_device_binding():
    """The kernel's own view of the listeners: ``0.0.0.0%lo:PORT`` and ``*%lo:PORT``."""
    if shutil.which("ss") is None:
        pytest.skip("`ss` (iproute2) is not installed: cannot read the listeners' interface binding")
    with create_backend("mooncake", host="127.0.0.1") as backend:
        listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
        mine = sorted(row.split()[3] for row in listening.splitlines()
                      if int(row.split()[3].rsplit(":", 1)[1]) in backend.listen_ports)
    assert len(mine) == 2 and all("%lo:" in local for local in mine), mine
