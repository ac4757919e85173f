"""Unit tests of the transfer layer's pure parts: segment merging, futures, handles, shm cleanup."""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys

import pytest
import torch

from epd.transfer import (
    TransferError,
    TransferFuture,
    TransferState,
    cleanup_stale_segments,
    create_backend,
    merge_segments,
)
from epd.transfer.base import check_bounds
from epd.transfer.mooncake import parse_handle as parse_mooncake
from epd.transfer.shm import ShmBackend
from epd.transfer.shm import parse_handle as parse_shm


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- merge_segments ---------------------------------------------------------------------
def test_merge_segments_coalesces_runs_contiguous_on_both_sides():
    assert merge_segments([0, 4, 8, 16], [100, 104, 108, 200], [4, 4, 4, 4]) == (
        [0, 16],
        [100, 200],
        [12, 4],
    )


def test_merge_segments_keeps_runs_contiguous_on_one_side_only():
    # local contiguous, remote not; then remote contiguous, local not
    assert merge_segments([0, 4, 20], [0, 50, 54], [4, 4, 4]) == ([0, 4, 20], [0, 50, 54], [4, 4, 4])


def test_merge_segments_drops_empty_and_keeps_order():
    # (8,4) stays first; the empty segment is skipped and (4,4) extends (0,4)
    assert merge_segments([8, 0, 4, 4], [8, 0, 4, 4], [4, 4, 0, 4]) == ([8, 0], [8, 0], [4, 8])
    assert merge_segments([], [], []) == ([], [], [])


def test_merge_segments_rejects_mismatched_lists():
    with pytest.raises(TransferError):
        merge_segments([0, 1], [0], [1, 1])
    with pytest.raises(TransferError):
        merge_segments([-1], [0], [1])


def test_check_bounds_is_exclusive_at_the_end():
    check_bounds([0, 60], [4, 4], 64, "local")
    with pytest.raises(TransferError, match=r"\[61, 65\)"):
        check_bounds([61], [4], 64, "remote")


# -- TransferFuture ---------------------------------------------------------------------
def test_future_success_and_failure_states():
    ok: cf.Future = cf.Future()
    fut = TransferFuture(ok, nbytes=10, timeout_s=5.0)
    assert fut.state is TransferState.PENDING and not fut.done()
    ok.set_result(None)
    fut.wait()
    assert fut.state is TransferState.SUCCESS and fut.done() and fut.nbytes == 10

    bad: cf.Future = cf.Future()
    fut = TransferFuture(bad, nbytes=1, timeout_s=5.0)
    bad.set_exception(TransferError("peer gone"))
    assert fut.state is TransferState.FAILED
    with pytest.raises(TransferError, match="peer gone"):
        fut.wait()


def test_future_failed_is_sticky_after_deadline():
    inner: cf.Future = cf.Future()
    fut = TransferFuture(inner, nbytes=1, timeout_s=0.01)
    with pytest.raises(TransferError):
        fut.wait()
    assert fut.state is TransferState.FAILED
    inner.set_result(None)  # the backend finishes late
    assert fut.state is TransferState.FAILED
    with pytest.raises(TransferError):
        fut.wait()


def test_future_short_wait_does_not_fail_the_transfer():
    inner: cf.Future = cf.Future()
    fut = TransferFuture(inner, nbytes=1, timeout_s=30.0)
    with pytest.raises(TransferError):
        fut.wait(timeout_s=0.0)
    assert fut.state is TransferState.PENDING
    inner.set_result(None)
    fut.wait()
    assert fut.state is TransferState.SUCCESS


# -- handles ----------------------------------------------------------------------------
def test_parse_handles():
    assert parse_mooncake("mooncake://127.0.0.1:15001/7f00aa00/4096") == ("127.0.0.1:15001", 0x7F00AA00, 4096)
    assert parse_shm("shm://epd-12-3-decode/12/65536") == ("epd-12-3-decode", 12, 65536)
    for bad in ("shm://epd-1-0/1/10", "mooncake://host/zz/1", "mooncake://h:1/ab/-1", ""):
        with pytest.raises(TransferError):
            parse_mooncake(bad)
    for bad in ("mooncake://h:1/ab/1", "shm://../etc/passwd/1/1", "shm://epd-1-0/x/1", ""):
        with pytest.raises(TransferError):
            parse_shm(bad)


def test_create_backend_rejects_unknown_kind():
    with pytest.raises(ValueError, match="nccl"):
        create_backend("nccl")


# -- shm backend in one process -----------------------------------------------------------
def test_shm_backend_in_process(tmp_path):
    with ShmBackend(shm_dir=str(tmp_path)) as a, ShmBackend(shm_dir=str(tmp_path)) as b:
        src = a.allocate(64, "src")
        dst = b.allocate(64, "d s/t")
        pid = os.getpid()
        assert dst.handle == f"shm://epd-{pid}-{dst.handle.split('-')[2]}-d_s_t/{pid}/64"
        src.tensor.copy_(torch.arange(64, dtype=torch.uint8))
        a.write(src, dst.handle, [0, 32], [8, 40], [4, 8])
        assert dst.tensor[8:12].tolist() == [0, 1, 2, 3]
        assert dst.tensor[40:48].tolist() == list(range(32, 40))
        assert int(dst.tensor.sum()) == sum(range(4)) + sum(range(32, 40))
        assert (a.stats.bytes_written, a.stats.transfers) == (12, 1)
        names = sorted(os.listdir(tmp_path))
        assert len(names) == 2
    assert os.listdir(tmp_path) == []


def test_cleanup_stale_segments_removes_only_dead_owners(tmp_path):
    dead = _dead_pid()
    for name in (f"epd-{dead}-0-x", f"epd-{os.getpid()}-0-y", "other-1", "epd-notapid-0"):
        (tmp_path / name).write_bytes(b"\0" * 8)
    assert cleanup_stale_segments(str(tmp_path)) == [f"epd-{dead}-0-x"]
    assert sorted(os.listdir(tmp_path)) == sorted([f"epd-{os.getpid()}-0-y", "other-1", "epd-notapid-0"])


def test_shm_owner_dead_is_an_error_before_any_copy(tmp_path):
    dead = _dead_pid()
    (tmp_path / f"epd-{dead}-0-x").write_bytes(b"\0" * 16)
    with ShmBackend(shm_dir=str(tmp_path)) as a:
        src = a.allocate(16)
        with pytest.raises(TransferError, match="gone"):
            a.write(src, f"shm://epd-{dead}-0-x/{dead}/16", [0], [0], [16])
        assert a.stats.failures == 1
