"""Protobuf ↔ typed records for decode: the only module where ``epd.v1`` messages and the
engine's records (``epd.engine.decode_scheduler``, ``services/decode/core.py``) meet."""

from __future__ import annotations

from epd.engine.decode_scheduler import DecodeRequest
from epd.engine.kv_pool import KvLayout
from epd.engine.sampling import SamplingParams
from epd.wire.gen import epd_pb2 as pb


def layout_to_proto(layout: KvLayout) -> pb.KvLayout:
    return pb.KvLayout(num_layers=layout.num_layers, num_blocks=layout.num_blocks, block_size=layout.block_size,
                       num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype)


def kv_allocated(req: DecodeRequest, session: str, layout: KvLayout, instance_id: str) -> pb.KvAllocated:
    """The block reservation of ``req`` in the pool registered as ``session``."""
    return pb.KvAllocated(request_id=req.request_id, session=session, layout=layout_to_proto(layout),
                          block_ids=req.block_ids, decode_instance=instance_id)


def sampling_from_proto(msg: pb.KvReady) -> SamplingParams:
    return SamplingParams.from_proto(msg.sampling)


def token_delta(req: DecodeRequest, token: int, reason: str | None) -> pb.TokenDelta:
    """One generated token; ``reason`` (``stop``/``length``) when it is the last."""
    return pb.TokenDelta(request_id=req.request_id, token_ids=[token], finished=reason is not None,
                         finish_reason=reason or "", num_prompt_tokens=req.num_prompt_tokens, stage="decode",
                         offset=len(req.tokens) - 1)


def error_code(name: str) -> int:
    """``epd.v1.ErrorCode`` value of a code name such as ``OUT_OF_CAPACITY``."""
    return pb.ErrorCode.Value(name)
