"""Typed records of the prefill engine: what goes in (:class:`PrefillRequest`, :class:`FeatureRef`,
:class:`KvTarget`) and what comes out of a step (:class:`PrefillOutputs`, :class:`PrefillLoad`).

No protobuf here: ``services/prefill/convert.py`` is the only place both meet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from epd.engine.kv_pool import KvLayout
from epd.engine.sampling import SamplingParams


@dataclass
class PrefillRequest:
    """One prompt for prefill.

    Attributes:
        request_id: unique id.
        prompt_token_ids: token ids with each image's placeholder run already expanded.
        num_images: images whose features must arrive (:class:`FeatureRef`) before it can run.
        params: sampling of the first token (and of decode's, which the caller forwards).
        deadline: unix seconds; past it the request fails with ``TIMEOUT``.
        ctx: the caller's data, returned untouched with every output (the process keeps the
            reply addresses and the wire sampling parameters here).
    """

    request_id: str
    prompt_token_ids: list[int]
    num_images: int
    params: SamplingParams
    deadline: float
    ctx: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class FeatureRef:
    """Where one image's features ``[num_tokens, hidden]`` lie in an encoder's pool.

    Attributes:
        index: position of the image in the prompt (0-based).
        session: the holder's transfer session (opaque to the engine).
        offset: bytes from the start of the holder's region.
        nbytes: length in bytes.
        dtype: torch dtype name, e.g. ``float32``.
        shape: tensor shape.
        grid_thw: ``(t, h, w)`` patch grid of the image.
        source: instance id of the holder (named as the lost peer when a read fails).
    """

    index: int
    session: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    grid_thw: tuple[int, int, int]
    source: str = ""


@dataclass(frozen=True)
class KvTarget:
    """Decode's block reservation for one request: the KV is written there.

    Attributes:
        session: decode's transfer session.
        layout: decode's pool geometry.
        block_ids: block table, in token order.
        source: decode instance id.
    """

    session: str
    layout: KvLayout
    block_ids: tuple[int, ...]
    source: str = ""


@dataclass
class FirstToken:
    """The first generated token (send it at once: that is TTFT).

    ``finish_reason`` is ``"stop"`` / ``"length"`` when the request ends with it; ``logits`` the
    last prompt position's ``[vocab]`` float32 CPU logits when the engine keeps them.
    """

    request: PrefillRequest
    token_id: int
    finish_reason: str | None
    logits: torch.Tensor | None = None


@dataclass
class HandOff:
    """The prompt KV is in decode's blocks: decode may start (``KvReady``)."""

    request: PrefillRequest
    first_token_id: int
    rope_delta: int


@dataclass
class Release:
    """Decode's reserved blocks are not needed (finished with the first token, or KV failed)."""

    request: PrefillRequest
    reason: str


@dataclass
class Failure:
    """A request failed in prefill.

    Attributes:
        code: ``epd.v1.ErrorCode`` name (``INVALID_REQUEST``, ``UNAVAILABLE``, ``TIMEOUT``,
            ``INTERNAL``, ``OUT_OF_CAPACITY``).
        peer: instance id of the peer whose loss caused it (encoder or decode), else ``""``.
        release_decode: whether decode's blocks must be freed (``False`` when decode failed it).
    """

    request: PrefillRequest
    code: str
    message: str
    peer: str = ""
    release_decode: bool = True


@dataclass
class PrefillLoad:
    """What the registry publishes for a prefill instance (exact integers).

    Attributes:
        queued_requests: accepted and not yet handed off (its KV writes included).
        queued_tokens: their prompt tokens.
        features_pending: images whose features are not local yet.
        staging_used_bytes: bytes of the staging region in use (feature reads, KV staging).
    """

    queued_requests: int = 0
    queued_tokens: int = 0
    features_pending: int = 0
    staging_used_bytes: int = 0

    @property
    def inflight(self) -> int:
        """Requests not finished here (a drain waits for 0)."""
        return self.queued_requests


@dataclass
class PrefillOutputs:
    """What one :meth:`PrefillEngine.step` produced, in the order to send it.

    Attributes:
        first_tokens: first tokens of the batch that ran (before its KV writes are waited for).
        handoffs: requests whose KV arrived (``KvReady``).
        releases: requests whose decode blocks are to be freed (``AbortRequest``).
        failed: failed requests (``RequestFailed``; and ``AbortRequest`` to decode if
            ``release_decode``).
        busy: more work may be done right away (a batch ready, writes or reads in flight).
        load: the load after the step.
        kv_bytes: KV bytes the batch handed off in this step wrote.
        kv_exposed_s: seconds its writes took after its forward ended (the exposed transfer time).
    """

    first_tokens: list[FirstToken] = field(default_factory=list)
    handoffs: list[HandOff] = field(default_factory=list)
    releases: list[Release] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    busy: bool = False
    load: PrefillLoad = field(default_factory=PrefillLoad)
    kv_bytes: int = 0
    kv_exposed_s: float = 0.0
