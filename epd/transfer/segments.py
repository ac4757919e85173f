"""Batches of byte segments: validation, bounds checks and merging of contiguous runs."""

from __future__ import annotations

from typing import NamedTuple

from epd.transfer.future import TransferError


class Segments(NamedTuple):
    """A batch of byte segments: segment ``i`` is ``(local_offsets[i], remote_offsets[i], lengths[i])``."""

    local_offsets: list[int]
    remote_offsets: list[int]
    lengths: list[int]


def merge_segments(
    local_offsets: list[int], remote_offsets: list[int], lengths: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """Coalesce consecutive segments that are contiguous on both sides into one.

    Segment ``i+1`` joins segment ``i`` when it starts where ``i`` ends both locally and
    remotely. List order is kept (sort first to merge more); zero-length segments are
    dropped. Used to send a run of consecutive KV blocks as one transfer (DESIGN §6).

    Example: ``([0, 4, 16], [100, 104, 200], [4, 4, 4])`` → ``([0, 16], [100, 200], [8, 4])``.
    """
    check_lists(local_offsets, remote_offsets, lengths)
    out_l: list[int] = []
    out_r: list[int] = []
    out_n: list[int] = []
    for lo, ro, n in zip(local_offsets, remote_offsets, lengths, strict=True):
        if n == 0:
            continue
        if out_n and out_l[-1] + out_n[-1] == lo and out_r[-1] + out_n[-1] == ro:
            out_n[-1] += n
        else:
            out_l.append(lo)
            out_r.append(ro)
            out_n.append(n)
    return out_l, out_r, out_n


def check_lists(local_offsets: list[int], remote_offsets: list[int], lengths: list[int]) -> None:
    """Raise :class:`TransferError` unless the three lists have one length and no negative entry."""
    if not len(local_offsets) == len(remote_offsets) == len(lengths):
        raise TransferError(
            f"segment lists differ in length: {len(local_offsets)} local, {len(remote_offsets)} remote, "
            f"{len(lengths)} lengths"
        )
    for x in (*local_offsets, *remote_offsets, *lengths):
        if x < 0:
            raise TransferError(f"negative offset or length {x}")


def check_bounds(offsets: list[int], lengths: list[int], size: int, side: str) -> None:
    """Raise :class:`TransferError` if any ``[offset, offset + length)`` exceeds ``size`` bytes."""
    for off, n in zip(offsets, lengths, strict=True):
        if off + n > size:
            raise TransferError(f"{side} segment [{off}, {off + n}) is outside the {size}-byte region")
