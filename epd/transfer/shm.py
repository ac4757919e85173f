"""Same-host transfer backend over POSIX shared memory (``/dev/shm``).

Each :meth:`ShmBackend.allocate` creates one segment file ``/dev/shm/epd-<pid>-<n>-<hint>``
and maps it; peers open the segment by name on first use, keep the mapping, and move
bytes with a plain memcpy (``Tensor.copy_``). Handle: ``shm://<segment>/<owner_pid>/<nbytes>``.

Liveness: before every transfer the owner pid must be alive (``os.kill(pid, 0)``) and the
segment file must still exist (the owner unlinks it on ``free``/``close``); otherwise
:class:`TransferError`. A crashed owner leaves its segments behind; any process can remove
them with :func:`cleanup_stale_segments`, which unlinks ``epd-<pid>-*`` segments whose pid
is dead (a recycled pid keeps them until it exits too).

Why not ``multiprocessing.shared_memory``: on Python < 3.13 every process that *attaches*
registers the segment with its ``resource_tracker``, which then unlinks the owner's
segment (with a leak warning) when the peer exits. Using ``os.open`` + ``mmap`` on
``/dev/shm`` keeps ownership with the creator alone. Linux only; peers must share the
``/dev/shm`` and pid namespaces (in containers: the same ipc and pid namespace).

Access: segments are created with mode 0600 (``fchmod`` after ``open``, so the umask cannot
change it): only processes of the owner's user (and root) can map them, so every peer must run
as that user, and any process of that user can read and write them. Run a deployment under a
user of its own.

Mappings are never closed explicitly: ``torch.frombuffer`` does not pin the buffer export,
so ``mmap.close()`` with a live tensor view would leave it dangling. The mapping goes away
with the last tensor that references it.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import re

import torch

from epd.transfer.base import Op, Region, Segments, TransferBackend, TransferError

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "epd-"
SEGMENT_MODE = 0o600  # owner read + write only
_HANDLE_RE = re.compile(r"^shm://(epd-[A-Za-z0-9_.-]+)/(\d+)/(\d+)$")
_HINT_RE = re.compile(r"[^A-Za-z0-9_.]")
_counter = itertools.count()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _map(path: str, nbytes: int, create: bool) -> torch.Tensor:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, SEGMENT_MODE)
    try:
        if create:
            os.fchmod(fd, SEGMENT_MODE)  # exactly owner-only, whatever the umask
            os.ftruncate(fd, nbytes)
        elif os.fstat(fd).st_size < nbytes:
            raise TransferError(f"segment {path} holds {os.fstat(fd).st_size} bytes, handle says {nbytes}")
        mm = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    return torch.frombuffer(mm, dtype=torch.uint8)  # keeps a reference to the mmap


def parse_handle(handle: str) -> tuple[str, int, int]:
    """Split an shm handle into ``(segment_name, owner_pid, nbytes)``.

    Raises:
        TransferError: not an ``shm://`` handle of this format.
    """
    m = _HANDLE_RE.match(handle)
    if m is None:
        raise TransferError(f"not a shm transfer handle: {handle!r}")
    return m.group(1), int(m.group(2)), int(m.group(3))


def cleanup_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink ``epd-<pid>-*`` segments whose owner pid is no longer running.

    Returns:
        names of the segments removed.
    """
    removed = []
    for name in sorted(os.listdir(shm_dir)):
        if not name.startswith(SEGMENT_PREFIX):
            continue
        pid_part = name[len(SEGMENT_PREFIX) :].split("-", 1)[0]
        if not pid_part.isdigit() or _pid_alive(int(pid_part)):
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
        except FileNotFoundError:
            continue
        removed.append(name)
    if removed:
        logger.info("removed %d stale shared-memory segments of dead processes", len(removed))
    return removed


class ShmBackend(TransferBackend):
    """Transfer backend for peers on the same host: shared-memory segments plus memcpy.

    Transfers run inline (a memcpy cannot block on a peer), asynchronous ones on a worker
    thread. Regions are host memory only: :meth:`allocate` on a ``cuda``/``npu`` device raises
    :class:`TransferError`. See the module docstring for naming, liveness and cleanup.

    Args:
        timeout_s: deadline of every operation in seconds.
        shm_dir: directory of the POSIX shared-memory filesystem.
    """

    kind = "shm"

    def __init__(self, timeout_s: float = 5.0, shm_dir: str = SHM_DIR) -> None:
        if not os.path.isdir(shm_dir):
            raise TransferError(f"shared-memory directory {shm_dir} does not exist (Linux only)")
        super().__init__(timeout_s=timeout_s, watchdog=False)
        self.shm_dir = shm_dir
        self._owned: dict[str, torch.Tensor] = {}
        self._peers: dict[str, torch.Tensor] = {}

    def _allocate(self, nbytes: int, name_hint: str, device: torch.device) -> Region:
        if device.type != "cpu":
            raise TransferError(
                f"the shm transfer backend holds regions in host shared memory only, not on {device}; "
                "use EPD_TRANSFER_BACKEND=mooncake for device memory"
            )
        pid = os.getpid()
        hint = _HINT_RE.sub("_", name_hint)[:48]
        name = f"{SEGMENT_PREFIX}{pid}-{next(_counter)}" + (f"-{hint}" if hint else "")
        try:
            tensor = _map(os.path.join(self.shm_dir, name), nbytes, create=True)
        except OSError as exc:
            raise TransferError(f"cannot create shared-memory segment {name}: {exc}") from exc
        with self._lock:
            self._owned[name] = tensor
        handle = f"shm://{name}/{pid}/{nbytes}"
        return Region(tensor=tensor, handle=handle, nbytes=nbytes, base_ptr=tensor.data_ptr())

    def _free(self, region: Region) -> None:
        name = parse_handle(region.handle)[0]
        with self._lock:
            self._owned.pop(name, None)
        try:
            os.unlink(os.path.join(self.shm_dir, name))
        except FileNotFoundError:
            logger.warning("shared-memory segment %s was already removed", name)

    def _remote_nbytes(self, remote_handle: str) -> int:
        return parse_handle(remote_handle)[2]

    def _remote_tensor(self, remote_handle: str) -> torch.Tensor:
        name, pid, nbytes = parse_handle(remote_handle)
        with self._lock:
            own = self._owned.get(name)
        if own is not None:
            return own
        path = os.path.join(self.shm_dir, name)
        if not _pid_alive(pid) or not os.path.exists(path):
            with self._lock:
                self._peers.pop(name, None)
            raise TransferError(f"peer region {name} is gone (owner pid {pid} exited or freed it)")
        with self._lock:
            cached = self._peers.get(name)
        if cached is not None:
            return cached
        try:
            tensor = _map(path, nbytes, create=False)
        except OSError as exc:
            raise TransferError(f"cannot open shared-memory segment {name}: {exc}") from exc
        with self._lock:
            self._peers[name] = tensor
        logger.debug("mapped peer segment %s (%d bytes)", name, nbytes)
        return tensor

    def _transfer(self, op: Op, local: Region, remote_handle: str, segs: Segments) -> None:
        remote = self._remote_tensor(remote_handle)
        if op == "write":
            src, dst, src_offsets, dst_offsets = local.tensor, remote, segs.local_offsets, segs.remote_offsets
        else:
            src, dst, src_offsets, dst_offsets = remote, local.tensor, segs.remote_offsets, segs.local_offsets
        for so, do, n in zip(src_offsets, dst_offsets, segs.lengths, strict=True):
            dst[do : do + n].copy_(src[so : so + n])

    def _close_backend(self) -> None:
        with self._lock:
            self._peers.clear()
