"""Protobuf ↔ typed records for prefill: the only module where ``epd.v1`` messages and the
engine's records (``services/prefill/records.py``) meet."""

from __future__ import annotations

from dataclasses import dataclass

from epd.engine.kv_pool import KvLayout
from epd.engine.sampling import SamplingParams
from epd.wire.gen import epd_pb2 as pb
from services.prefill.records import Failure, FeatureRef, FirstToken, HandOff, KvTarget, PrefillRequest, Release


@dataclass(frozen=True)
class Route:
    """Where a request's messages go (the :attr:`PrefillRequest.ctx` the process attaches).

    Attributes:
        reply_to: the gateway's inbox (TokenDelta, RequestFailed).
        decode_instance: the chosen decode instance id.
        decode_inbox: its inbox (KvAllocRequest, KvReady, AbortRequest).
        sampling: the wire sampling parameters, forwarded unchanged in KvReady.
    """

    reply_to: str
    decode_instance: str
    decode_inbox: str
    sampling: pb.SamplingParams


def request_from_proto(msg: pb.PrefillRequest, default_deadline: float) -> PrefillRequest:
    """The engine's request; ``default_deadline`` (unix s) when the gateway set none."""
    return PrefillRequest(
        request_id=msg.request_id, prompt_token_ids=list(msg.prompt_token_ids), num_images=len(msg.images),
        params=SamplingParams.from_proto(msg.sampling), deadline=msg.deadline or default_deadline,
        ctx=Route(msg.reply_to, msg.decode_instance, msg.decode_inbox, msg.sampling),
    )


def kv_alloc_request(req: PrefillRequest, reply_to: str) -> pb.KvAllocRequest:
    return pb.KvAllocRequest(request_id=req.request_id, num_tokens=req.num_tokens,
                             max_new_tokens=req.ctx.sampling.max_tokens, reply_to=reply_to)


def feature_ref_from_proto(msg: pb.FeaturesReady) -> FeatureRef:
    ref = msg.features
    return FeatureRef(index=msg.index, session=ref.session, offset=ref.offset, nbytes=ref.nbytes, dtype=ref.dtype,
                      shape=tuple(ref.shape), grid_thw=tuple(msg.grid_thw), source=msg.encoder_instance)


def layout_from_proto(p: pb.KvLayout) -> KvLayout:
    return KvLayout(p.num_layers, p.num_blocks, p.block_size, p.num_kv_heads, p.head_dim, p.dtype)


def kv_target_from_proto(msg: pb.KvAllocated) -> KvTarget:
    return KvTarget(msg.session, layout_from_proto(msg.layout), tuple(msg.block_ids), msg.decode_instance)


def token_delta(out: FirstToken) -> pb.TokenDelta:
    return pb.TokenDelta(
        request_id=out.request.request_id, token_ids=[out.token_id], finished=out.finish_reason is not None,
        finish_reason=out.finish_reason or "", num_prompt_tokens=out.request.num_tokens, stage="prefill", offset=0,
    )


def kv_ready(out: HandOff) -> pb.KvReady:
    req = out.request
    return pb.KvReady(
        request_id=req.request_id, num_prompt_tokens=req.num_tokens, first_token_id=out.first_token_id,
        rope_delta=out.rope_delta, sampling=req.ctx.sampling, reply_to=req.ctx.reply_to, deadline=req.deadline,
    )


def release(out: Release) -> pb.AbortRequest:
    return pb.AbortRequest(request_id=out.request.request_id, reason=out.reason)


def error_code(failure: Failure) -> int:
    return pb.ErrorCode.Value(failure.code)
