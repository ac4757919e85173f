"""A request's token stream at the gateway: reordering, failures, timeouts, detokenization,
stop strings."""

from __future__ import annotations

import asyncio
import time

from epd.wire.gen import epd_pb2 as pb
from services.gateway.protocol import ApiError

_STATUS = {pb.INVALID_REQUEST: 400, pb.UNAVAILABLE: 503, pb.TIMEOUT: 504, pb.INTERNAL: 500,
           pb.OUT_OF_CAPACITY: 503}
_TYPE = {400: "invalid_request_error", 503: "service_unavailable", 504: "timeout", 500: "internal_error"}


class TokenStream:
    """Turns ``TokenDelta`` / ``RequestFailed`` messages into ordered batches of token ids.

    The first token comes from prefill and the rest from decode over different
    connections, so deltas are reordered by ``offset`` before they are released.

    A failure (``RequestFailed``, or ``stage_lost`` from the gateway's registry watch) is first
    offered to ``recover`` (:meth:`RequestRun.recover`): when it returns a new attempt's queue,
    the stream goes on reading there, that attempt's offsets counted from the tokens already
    released, and the client sees one stream.

    Args:
        queue: the request's message queue (``(payload field, message[, perf_counter at receipt, sender])``).
        deadline: ``time.monotonic()`` value after which the request fails with 504.
        recover: ``async (code, message, peer, tokens so far) -> queue | None``; ``None``: no recovery.

    Raises (from iteration):
        ApiError: the pipeline reported a failure (status from its code) that was not
            recovered, or the deadline passed.
    """

    def __init__(self, queue: asyncio.Queue, deadline: float, recover=None) -> None:
        self.queue = queue
        self.deadline = deadline
        self.recover = recover
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.num_prompt_tokens = 0
        self._pending: dict[int, pb.TokenDelta] = {}
        self._base = 0  # output offset of the current attempt's first token
        self.done = False
        self.received_at = 0.0  # perf_counter when the message that completed the last batch arrived

    async def _message(self):
        timeout = self.deadline - time.monotonic()
        if timeout <= 0:
            raise ApiError(504, "request timed out", type_="timeout")
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise ApiError(504, "request timed out waiting for the pipeline", type_="timeout") from None

    async def next(self) -> list[int] | None:
        """The next in-order token ids, or ``None`` once finished."""
        while not self.done:
            delta = self._pending.pop(len(self.token_ids), None)
            if delta is not None:
                self.token_ids.extend(delta.token_ids)
                if delta.finished:
                    self.done = True
                    self.finish_reason = delta.finish_reason or "stop"
                return list(delta.token_ids)
            field, msg, *stamp = await self._message()
            self.received_at = stamp[0] if stamp else time.perf_counter()
            if field == "token_delta":
                self.num_prompt_tokens = self.num_prompt_tokens or msg.num_prompt_tokens
                self._pending[self._base + msg.offset] = msg
                continue
            if field == "request_failed":
                code, text, peer = msg.code, f"{msg.stage}: {msg.message}", msg.peer
            elif field == "stage_lost":
                code, text, peer = pb.UNAVAILABLE, f"instance {msg.instance_id} is gone", msg.instance_id
            else:
                continue
            queue = await self.recover(code, text, peer, list(self.token_ids)) if self.recover else None
            if queue is None:
                status = _STATUS.get(code, 500)
                raise ApiError(status, text, type_=_TYPE.get(status, "error"))
            self.queue, self._base = queue, len(self.token_ids)
            self._pending.clear()  # whatever the old attempt had in flight is not ours anymore
        return None

    async def first(self) -> list[int]:
        ids = await self.next()
        assert ids is not None
        return ids

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[int]:
        ids = await self.next()
        if ids is None:
            raise StopAsyncIteration
        return ids


class Detokenizer:
    """Incremental detokenization over a sliding window of ids (as vLLM's
    ``detokenize_incrementally``): each call decodes only the ids since the previous emit
    point, so a request's total cost is linear in its length. An incomplete UTF-8 sequence
    (decoded as U+FFFD) is held back until a later token completes it.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # window start: context so a token decodes as it would in place
        self._read_offset = 0  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _delta(self, final: bool) -> str:
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        window = self._decode(self.ids[self._prefix_offset :])
        if len(window) <= len(prefix) or (window.endswith("\ufffd") and not final):
            return ""
        delta = window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += delta
        return delta

    def add(self, token_ids: list[int]) -> str:
        """New text for ``token_ids`` (may be empty while a character is incomplete)."""
        self.ids.extend(token_ids)
        return self._delta(final=False)

    def finish(self) -> str:
        """Text still held back at the end (an incomplete UTF-8 sequence, as U+FFFD)."""
        return self._delta(final=True)


class StopChecker:
    """Stop strings on detokenized text, across chunk boundaries (OpenAI ``stop``).

    Text that could still become a stop string (a suffix equal to some stop string's
    prefix) is held back; on a match the text before the stop is released and the stop
    string itself never is.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """``(text safe to emit, matched)``; after a match the caller must stop feeding."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Held-back text, released when generation ends without a match."""
        text, self.held = self.held, ""
        return text
