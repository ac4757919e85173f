"""Protobuf ↔ typed records for the encoder: the only module where ``epd.v1`` messages and the
engine's records (``services/encoder/records.py``) meet."""

from __future__ import annotations

from dataclasses import dataclass

from epd.registry.registry import FeatureEntry
from epd.wire.gen import epd_pb2 as pb
from services.encoder.core import PoolEntry
from services.encoder.records import EncodeFailure, EncodeRequest, FeaturesOut, ImageInput


@dataclass(frozen=True)
class Route:
    """Where a request's messages go (the :attr:`EncodeRequest.ctx` the process attaches).

    Attributes:
        reply_to: the gateway's inbox (RequestFailed).
        prefill_instance: the consuming prefill's instance id.
        prefill_inbox: its inbox (FeaturesReady, AbortRequest).
    """

    reply_to: str
    prefill_instance: str
    prefill_inbox: str


def request_from_proto(msg: pb.EncodeRequest, blobs: list[bytes], deadline: float) -> EncodeRequest:
    """The engine's request; each image's file is the extra frame ``blob_index`` (``None`` if missing)."""
    images = [
        ImageInput(index=item.index, mm_hash=item.mm_hash, grid_thw=tuple(item.grid_thw),
                   data=blobs[item.blob_index] if item.blob_index < len(blobs) else None)
        for item in msg.images
    ]
    return EncodeRequest(msg.request_id, images, deadline, Route(msg.reply_to, msg.prefill_instance,
                                                                 msg.prefill_inbox))


def feature_entry(entry: PoolEntry, holder: str, handle: str) -> FeatureEntry:
    """The registry's record of a pool entry held by instance ``holder`` in region ``handle``."""
    return FeatureEntry(holder=holder, handle=handle, offset=entry.offset, nbytes=entry.nbytes, dtype=entry.dtype,
                        shape=entry.shape, grid_thw=entry.grid_thw)


def features_ready(out: FeaturesOut, holder: str, handle: str) -> pb.FeaturesReady:
    entry = out.entry
    ref = pb.TensorRef(session=handle, offset=entry.offset, nbytes=entry.nbytes, dtype=entry.dtype, shape=entry.shape)
    return pb.FeaturesReady(request_id=out.request.request_id, mm_hash=entry.mm_hash, index=out.index, features=ref,
                            grid_thw=entry.grid_thw, encoder_instance=holder)


def error_code(failure: EncodeFailure) -> int:
    return pb.ErrorCode.Value(failure.code)


def code_name(code: int) -> str:
    return pb.ErrorCode.Name(code)
