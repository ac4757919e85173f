"""Decode-side scheduler: block reservations, admission, continuous batching, preemption.

Lifecycle of a request in decode (SGLang's decode lifecycle, nano-vllm's block manager)::

    PreallocQueue (KvAllocRequest waiting for free blocks, FIFO)
      ▸ Transfer (blocks for the prompt reserved; prefill WRITEs the KV into them)
      ▸ Running (KvReady: joins the batch at the next step; one block more whenever its
        last block fills)
      ▸ finished / aborted / failed / timed out / preempted: blocks freed

Admission keeps one free block per running request in hand (the watermark), so that
admitting new prompts does not starve running requests of the block they need next. When a
running request still cannot grow, a request is preempted:
its blocks are freed and it fails with a clear error (decode cannot recompute a prompt).
The victim is always the most recently joined running request (first come, first served), as
in vLLM's scheduler.
All state is plain integers and lists; no tensors, no sockets.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from epd.engine.blocks import BlockAllocator


@dataclass
class PendingAlloc:
    """A KvAllocRequest waiting for blocks."""

    request_id: str
    num_tokens: int
    deadline: float
    reply_to: str


@dataclass
class DecodeRequest:
    """A request holding blocks in decode.

    Attributes:
        block_ids: block table, in token order.
        num_prompt_tokens: tokens whose KV prefill wrote.
        past_len: tokens with KV in the cache; the next token's KV goes to slot ``past_len``.
        tokens: generated ids (first from prefill).
        rope_delta: M-RoPE offset (position = ``past_len + rope_delta``).
        ctx: caller data (sampler, params, reply address).
    """

    request_id: str
    block_ids: list[int]
    num_prompt_tokens: int
    deadline: float
    reply_to: str
    past_len: int = 0
    rope_delta: int = 0
    tokens: list[int] = field(default_factory=list)
    ctx: Any = None


class DecodeScheduler:
    """Admission and batching over a :class:`BlockAllocator`.

    Args:
        allocator: the pool's block accounting.
        block_size: tokens per block.
        max_batch: most requests per decode step.
    """

    def __init__(self, allocator: BlockAllocator, block_size: int, max_batch: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_batch = max_batch
        self.queue: deque[PendingAlloc] = deque()
        self.reserved: dict[str, DecodeRequest] = {}  # waiting for KvReady
        self.running: dict[str, DecodeRequest] = {}  # insertion order = join order

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_requests(self) -> int:
        return len(self.queue) + len(self.reserved) + len(self.running)

    # -- admission ---------------------------------------------------------------------
    def enqueue(self, alloc: PendingAlloc) -> None:
        """Queue a block request.

        Raises:
            ValueError: the prompt can never fit (more blocks than the pool has) or the
                request id is already known.
        """
        if self.blocks_for(alloc.num_tokens) + 1 > self.allocator.num_blocks:
            raise ValueError(
                f"prompt of {alloc.num_tokens} tokens needs {self.blocks_for(alloc.num_tokens)} KV blocks "
                f"(+1 to grow); the pool has {self.allocator.num_blocks}"
            )
        if self.knows(alloc.request_id):
            raise ValueError(f"request {alloc.request_id} already holds KV blocks")
        self.queue.append(alloc)

    def knows(self, request_id: str) -> bool:
        return (request_id in self.reserved or request_id in self.running
                or any(a.request_id == request_id for a in self.queue))

    def admit(self) -> list[DecodeRequest]:
        """Reserve blocks for queued requests, FIFO, while they fit above the watermark."""
        admitted = []
        while self.queue:
            head = self.queue[0]
            need = self.blocks_for(head.num_tokens)
            if not self.allocator.can_allocate(need + len(self.running)):
                break
            self.queue.popleft()
            req = DecodeRequest(head.request_id, self.allocator.allocate(need), head.num_tokens,
                                head.deadline, head.reply_to)
            self.reserved[req.request_id] = req
            admitted.append(req)
        return admitted

    def start(self, request_id: str, first_token: int, rope_delta: int, deadline: float, ctx: Any) -> DecodeRequest:
        """KvReady: the request joins the running batch at the next step. Raises ``KeyError``."""
        req = self.reserved.pop(request_id)
        req.past_len = req.num_prompt_tokens
        req.rope_delta = rope_delta
        req.tokens = [first_token]
        req.deadline = deadline or req.deadline
        req.ctx = ctx
        self.running[request_id] = req
        return req

    # -- batching ----------------------------------------------------------------------
    def schedule(self) -> tuple[list[DecodeRequest], list[DecodeRequest]]:
        """The next step's batch, with a KV slot guaranteed for each member.

        Returns:
            ``(batch, preempted)``: preempted requests have lost their blocks and left the
            running set; the caller fails them.
        """
        batch: list[DecodeRequest] = []
        preempted: list[DecodeRequest] = []
        for req in list(self.running.values()):
            if len(batch) == self.max_batch:
                break
            if req.request_id not in self.running:  # preempted meanwhile
                continue
            while req.past_len >= len(req.block_ids) * self.block_size:
                if self.allocator.can_allocate(1):
                    req.block_ids.extend(self.allocator.allocate(1))
                    continue
                victim = next(reversed(self.running.values()))  # youngest, maybe req itself
                self.release(victim.request_id)
                preempted.append(victim)
                if victim in batch:
                    batch.remove(victim)
                if victim is req:
                    break
            else:
                batch.append(req)
        return batch, preempted

    # -- ending ------------------------------------------------------------------------
    def release(self, request_id: str) -> DecodeRequest | None:
        """Forget the request wherever it is and free its blocks. Returns it (``None`` if unknown)."""
        req = self.running.pop(request_id, None) or self.reserved.pop(request_id, None)
        if req is not None:
            self.allocator.free(req.block_ids)
            return req
        for alloc in self.queue:
            if alloc.request_id == request_id:
                self.queue.remove(alloc)
                return DecodeRequest(alloc.request_id, [], alloc.num_tokens, alloc.deadline, alloc.reply_to)
        return None

    def expired(self, now: float) -> list[DecodeRequest]:
        """Release and return every request past its deadline."""
        ids = [a.request_id for a in self.queue if a.deadline < now]
        ids += [r.request_id for r in (*self.reserved.values(), *self.running.values()) if r.deadline < now]
        return [r for r in (self.release(i) for i in ids) if r is not None]
