"""The gateway's core: admission, route planning, submit / abort and the registry watch.

No HTTP here (vLLM's ``AsyncLLM`` vs its API server): :mod:`services.gateway.http` and
:mod:`services.gateway.handlers` are the OpenAI HTTP/SSE layer over this, and no module of the
core imports the web framework (``tests/unit/test_structure.py``). The core's modules, bottom up:
:mod:`~services.gateway.router` (instance choice), :mod:`~services.gateway.engine_client` (the
wire), this module (:class:`GatewayCore`), :mod:`~services.gateway.attempts` (retries and
migrations of one request), :mod:`~services.gateway.generation` (a request's output: tokens to
text, stop strings, metrics).

Lifecycle of a request at the gateway::

    auth ▸ parse + validate ▸ fetch images (data:/file/http), hash, header-only size check   [HTTP layer]
      ▸ template, tokenize, placeholders ▸ max_tokens ▸ feature-cache lookup (Redis) ▸ route + instances
      ▸ PrefillRequest to prefill, EncodeRequest(s) to encoder(s) (to the holder for cached images)
      ▸ TokenDelta stream (first token from prefill, the rest from decode), reordered by offset
      ▸ detokenize incrementally, stop strings
      ▸ JSON response or SSE chunks ending with ``data: [DONE]``                               [HTTP layer]
      ▸ on error / stop string / disconnect / timeout: AbortRequest to every stage involved

The cached route reuses the encoder → prefill contract: each image whose ``mm_hash`` is
live in Redis goes to its holder (not to the least-loaded encoder); the holder finds it in
its pool, leases it (so it cannot be evicted while prefill reads it) and sends prefill the
``FeaturesReady`` at once, without encoding. If the entry was evicted in the meantime, the
holder has the image bytes and encodes it again; if the holder died, the request is retried
(:mod:`services.gateway.attempts`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from epd.config import GatewayConfig
from epd.registry.controller_state import get_controller_state
from epd.registry.peers import PeerWatch
from epd.registry.registry import FeatureEntry, Heartbeat, InstanceInfo, Registry, RegistryError
from epd.wire.auth import Signer, check_exposure, load_secret
from epd.wire.gen import epd_pb2 as pb
from epd.wire.sockets import PeerUnavailable, WireTap
from services.gateway.engine_client import EngineClient
from services.gateway.metrics import GatewayMetrics
from services.gateway.prompt import Prompt, PromptBuilder
from services.gateway.protocol import ApiError
from services.gateway.router import NoInstance, Plan, Router

logger = logging.getLogger(__name__)

BLOCKS_GRACE_S = 2.0  # decode's heartbeat shows a reservation within heartbeat + refresh periods


@dataclass
class Admitted:
    """One attempt of a request in the pipeline (a retry or migration is a new attempt).

    Attributes:
        rid: the attempt's request id on the wire (the client's id, plus ``-r1``, ``-m1``… for
            later attempts, so no stage confuses it with the one it replaces).
        plan: route and instances; holds the in-flight charges.
        prompt: token ids and images.
        max_tokens: generation budget of this attempt.
        t_arrival: ``time.perf_counter()`` when the HTTP handler started.
        queue: the attempt's message queue (:meth:`EngineClient.open`).
        deps: instance id -> incarnation of every stage it was sent to (failure detection).
        feature_bytes: derived bytes prefill reads from encoder pools.
    """

    rid: str
    plan: Plan
    prompt: Prompt
    max_tokens: int
    t_arrival: float
    queue: asyncio.Queue | None = None
    deps: dict[str, str] = field(default_factory=dict)
    feature_bytes: int = 0
    started: bool = False  # its first token arrived (encoder and prefill charges released)
    decoding: bool = False  # a token came from its decode: only the decode still matters


class StageUnreachable(RuntimeError):
    """A message to one stage (``instance_id`` in its life ``incarnation``) of a plan was not delivered."""

    def __init__(self, instance_id: str, incarnation: str, why: str) -> None:
        super().__init__(f"stage {instance_id} unreachable: {why}")
        self.instance_id, self.incarnation = instance_id, incarnation


class GatewayCore:
    """The gateway without HTTP: config, tokenizer, registry view, router, wire, metrics, and the
    attempts in flight. The HTTP layer calls :meth:`start` / :meth:`stop`, :meth:`max_tokens`,
    :meth:`health`, and :meth:`services.gateway.generation.Generation.start` (which drives
    :meth:`submit`, :meth:`end_attempt` and the rest through
    :class:`~services.gateway.attempts.RequestRun`).

    The gateway registers itself in the registry (role ``gateway``) so that stages can tell when
    the gateway a request's tokens go to is gone, and watches the registry for stages that are
    gone (:class:`PeerWatch`): every attempt that depends on one is told (``stage_lost``).
    """

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.model_name = cfg.served_model_name or Path(cfg.model).name
        self.prompts = PromptBuilder(cfg.model)
        secret = load_secret(cfg.cluster_secret, cfg.cluster_secret_file)
        check_exposure(cfg.host, secret, "EPD_HOST")
        self.registry = Registry(cfg.redis_url, secret=secret)
        self.router = Router()
        self.peers = PeerWatch(grace_s=2 * cfg.heartbeat_s + 0.5)
        self.metrics = GatewayMetrics(self.router)
        self.instance_id = cfg.instance_id or f"gateway-{id(self):x}"
        self.client = EngineClient(cfg.host, cfg.port, self.instance_id, tap=WireTap(cfg.wire_tap),
                                   signer=Signer(secret), send_timeout_s=cfg.send_timeout_s,
                                   queue_max=cfg.send_queue_max)
        self.attempts: dict[str, Admitted] = {}  # in flight, by attempt id
        self.client.on_accepted = self._on_accepted
        self.client.on_rejected = self.metrics.rejected.inc
        self.heartbeat: Heartbeat | None = None
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        """Load the registry view, start the wire's reader, register (heartbeat) and the refresh
        task. Call on the event loop that serves the requests."""
        await self.refresh()
        self.client.start()
        info = InstanceInfo(instance_id=self.instance_id, roles=["gateway"], inbox=self.client.address,
                            model=str(self.cfg.model), pid=os.getpid(), incarnation=uuid.uuid4().hex[:16])
        self.heartbeat = Heartbeat(self.registry, info, lambda: {"inflight": float(len(self.attempts))},
                                   self.cfg.heartbeat_s, self.cfg.instance_ttl_s)
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.heartbeat.beat)
        except RegistryError as exc:  # the heartbeat thread keeps trying
            logger.warning("gateway not registered yet: %s", exc)
        self.heartbeat.start()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def stop(self) -> None:
        """Stop the refresh task, deregister, close the wire."""
        if self._refresher:
            self._refresher.cancel()
        if self.heartbeat is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.heartbeat.stop)
        await self.client.close()

    async def refresh(self) -> None:
        """Refresh the router's view from the registry (every ``EPD_REGISTRY_REFRESH_S``); every
        attempt depending on an instance found gone gets ``stage_lost``. A Redis failure keeps
        the last view (logged)."""
        try:
            snapshot, elastic = await asyncio.get_running_loop().run_in_executor(None, self._read_registry)
        except RegistryError as exc:
            logger.warning("registry refresh failed: %s", exc)
            return
        self.metrics.elastic = elastic
        gone = self.peers.update(snapshot)
        self.router.update(self.peers.snapshot())  # rides out a Redis restart's empty registry
        for ref in gone:
            self.metrics.peer_deaths.labels(ref.instance_id).inc()
            hit = [a for a in self.attempts.values() if a.deps.get(ref.instance_id) == ref.incarnation]
            logger.warning("instance %s (incarnation %s) is gone; %d request(s) depended on it",
                           ref.instance_id, ref.incarnation, len(hit))
            for adm in hit:
                adm.queue.put_nowait(("stage_lost", ref, time.perf_counter(), ""))

    def _read_registry(self):
        """The live instances and ``epd up``'s elastic controller state (None without one)."""
        return self.registry.instances(), get_controller_state(self.registry)

    async def _refresh_loop(self) -> None:
        parent = os.getppid()
        while True:
            await asyncio.sleep(self.cfg.registry_refresh_s)
            await self.refresh()
            if os.getppid() != parent:  # launcher died: shut down instead of lingering
                logger.error("parent process exited, shutting down")
                os.kill(os.getpid(), signal.SIGTERM)

    def health(self) -> tuple[bool, dict[str, int]]:
        """``(ready, instances per role)``: ready when at least one prefill and one decode instance
        are in the view."""
        counts = {role: len(v) for role, v in self.router.instances.items()}
        return counts["prefill"] > 0 and counts["decode"] > 0, counts

    # -- admission -----------------------------------------------------------------------
    def stage_dtype(self, info: InstanceInfo) -> str:
        """The dtype a stage's transfers are in: ``EPD_DTYPE`` when the gateway sets one, else what
        the instance published (its resolved ``EPD_DTYPE``), else float32 (older entries)."""
        return self.cfg.dtype if self.cfg.dtype != "auto" else (info.dtype or "float32")

    def max_tokens(self, requested: int | None, prompt_len: int) -> int:
        """The generation budget. Raises :class:`ApiError` 400 when the context cannot hold it."""
        max_tokens = requested or self.cfg.default_max_tokens
        limit = self.prompts.max_model_len
        if limit and prompt_len + max_tokens > limit:
            if requested:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                    f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
                                    f"{max_tokens} in the completion).", param="max_tokens")
            max_tokens = limit - prompt_len
            if max_tokens < 1:
                raise ApiError(400, f"prompt of {prompt_len} tokens fills the context of {limit}",
                               param="messages")
        return max_tokens

    async def _cached_features(self, prompt: Prompt) -> dict[int, FeatureEntry]:
        """Images whose features are live in a live holder's pool, by image index."""
        if not prompt.images:
            return {}

        def lookup():
            return [self.registry.get_feature(im.image.mm_hash) for im in prompt.images]

        try:
            entries = await asyncio.get_running_loop().run_in_executor(None, lookup)
        except RegistryError as exc:
            logger.warning("feature cache lookup failed, encoding instead: %s", exc)
            return {}
        return {im.index: e for im, e in zip(prompt.images, entries, strict=True)
                if e is not None and self.router.is_usable(e.holder) and list(e.grid_thw) == list(im.grid_thw)
                and e.shape and e.shape[0] == im.num_tokens}

    async def submit(self, rid: str, sampling: pb.SamplingParams, prompt: Prompt, max_tokens: int,
                     t_arrival: float) -> Admitted:
        """Choose route and instances, open the attempt's stream and send it into the pipeline.

        Raises:
            ApiError: 503 (no instance of a needed role) or 429 (every instance of a role
                full), both with ``Retry-After``.
            StageUnreachable: a stage of the plan did not take its message within
                EPD_SEND_TIMEOUT_S (the attempt is aborted and its charges released; the
                caller suspects that instance and may submit again).
        """
        if not self.router.instances["prefill"] or not self.router.instances["decode"]:
            await self.refresh()
        cached = await self._cached_features(prompt)
        patches = [im.grid_thw[1] * im.grid_thw[2] for im in prompt.images]
        try:
            plan = self.router.plan(len(prompt.token_ids), max_tokens, patches, set(cached))
        except NoInstance as exc:
            status = 429 if exc.saturated else 503
            logger.warning("request %s: %d: %s", rid, status, exc)
            raise ApiError(status, str(exc), type_="service_unavailable" if status == 503 else "rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        adm = Admitted(rid, plan, prompt, max_tokens, t_arrival)
        by_holder: dict[str, list[int]] = {}
        for index, entry in cached.items():
            by_holder.setdefault(entry.holder, []).append(index)
            adm.feature_bytes += entry.nbytes
        plan.holders.update(by_holder)
        stages = {plan.prefill.instance_id, plan.decode.instance_id, *plan.encoders, *plan.holders}
        adm.deps = {i: self.router.by_id[i].incarnation for i in stages if i in self.router.by_id}
        adm.queue = self.client.open(rid, {plan.prefill.instance_id, plan.decode.instance_id}, stages)
        self.attempts[rid] = adm
        now = time.time()
        items = [pb.ImageItem(mm_hash=im.image.mm_hash, index=im.index, width=im.image.width,
                              height=im.image.height, num_tokens=im.num_tokens, grid_thw=list(im.grid_thw))
                 for im in prompt.images]
        sends = [(plan.prefill.instance_id, self.client.send(plan.prefill.inbox, pb.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt.token_ids, images=items, sampling=sampling,
            decode_instance=plan.decode.instance_id, decode_inbox=plan.decode.inbox,
            reply_to=self.client.address, arrival_time=now, deadline=now + self.cfg.request_timeout_s,
        )))]
        # Cached images go to their holder, which leases the pool entry (so it cannot be
        # evicted while prefill reads it) and answers FeaturesReady at once without encoding;
        # if the entry was evicted meanwhile, the holder still has the bytes and re-encodes.
        for enc_id, indices in [*by_holder.items(), *plan.encoders.items()]:
            if enc_id in plan.encoders:
                for i in indices:
                    adm.feature_bytes += self.prompts.feature_bytes(
                        prompt.images[i].num_tokens, self.stage_dtype(self.router.by_id[enc_id]))
                self.metrics.instance_requests.labels(enc_id, "encoder").inc()
            # the inbox is taken now: the view may change while the sends are awaited
            sends.append((enc_id, self._send_encode(rid, plan, self.router.by_id[enc_id].inbox,
                                                    [items[i] for i in indices],
                                                    [prompt.images[i].image.data for i in indices])))
        results = await asyncio.gather(*(s for _, s in sends), return_exceptions=True)
        failed = [(iid, r) for (iid, _), r in zip(sends, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            self.end_attempt(adm, "gateway could not reach a stage")
            iid, exc = failed[0]
            if isinstance(exc, PeerUnavailable):
                raise StageUnreachable(iid, adm.deps.get(iid, ""), str(exc))
            raise exc
        self.metrics.ingress.observe(time.perf_counter() - t_arrival)
        m = self.metrics
        m.requests.labels(plan.route).inc()
        m.instance_requests.labels(plan.prefill.instance_id, "prefill").inc()
        m.instance_requests.labels(plan.decode.instance_id, "decode").inc()
        m.cache_hits.inc(len(cached))
        m.cache_misses.inc(len(prompt.images) - len(cached))
        m.images_encoded.inc(len(prompt.images) - len(cached))
        m.prompt_tokens.inc(len(prompt.token_ids))
        logger.info("request %s: route %s, %d prompt tokens, %d image(s) (%d cached), prefill %s, decode %s",
                    rid, plan.route, len(prompt.token_ids), len(prompt.images), len(cached),
                    plan.prefill.instance_id, plan.decode.instance_id)
        return adm

    async def _send_encode(self, rid: str, plan: Plan, inbox: str, items: list[pb.ImageItem],
                           blobs: list[bytes]) -> None:
        """One EncodeRequest to the encoder at ``inbox`` for ``items``; ``blobs`` are their files, in order."""
        enc_items = []
        for blob_index, src in enumerate(items):
            item = pb.ImageItem()
            item.CopyFrom(src)
            item.blob_index = blob_index
            enc_items.append(item)
        await self.client.send(inbox, pb.EncodeRequest(
            request_id=rid, images=enc_items, prefill_instance=plan.prefill.instance_id,
            prefill_inbox=plan.prefill.inbox, reply_to=self.client.address,
        ), blobs)

    def _on_accepted(self, rid: str, field_name: str, sender: str) -> None:
        adm = self.attempts.get(rid)
        if adm is None or adm.decoding:
            return
        if field_name == "token_delta" and sender == adm.plan.decode.instance_id:
            adm.decoding = True  # the KV reached decode: encoder and prefill can go without harm
            adm.deps = {i: inc for i, inc in adm.deps.items() if i == sender}

    def suspect(self, instance_id: str, incarnation: str) -> None:
        """Keep the router off that life of ``instance_id`` for two TTLs (a dead one has left
        the registry by then; a wrongly suspected one is chosen again)."""
        if self.router.suspect(instance_id, incarnation, 2 * self.cfg.instance_ttl_s):
            logger.warning("instance %s (incarnation %s) suspected unreachable", instance_id, incarnation)

    def mark_started(self, adm: Admitted) -> None:
        """The attempt's first token arrived: encoders are done with it (prefill still has to
        hand the KV to decode), and their charges and prefill's are released."""
        if adm.started:
            return
        adm.started = True
        adm.deps = {i: inc for i, inc in adm.deps.items()
                    if i in (adm.plan.prefill.instance_id, adm.plan.decode.instance_id)}
        self.router.release(adm.plan, ("encoder", "prefill"))
        asyncio.get_running_loop().call_later(BLOCKS_GRACE_S, self.router.release_blocks, adm.plan)

    def end_attempt(self, adm: Admitted, abort_reason: str | None) -> None:
        """Forget an attempt: close its stream, release its charges, and (``abort_reason``
        given) tell every stage of its plan to drop it. Idempotent."""
        self.client.close_stream(adm.rid)
        if self.attempts.pop(adm.rid, None) is None:
            return
        self.router.release(adm.plan)
        if not adm.started:
            self.router.release_blocks(adm.plan)
        if abort_reason is not None:
            self.abort(adm.rid, adm.plan, abort_reason)

    def abort(self, rid: str, plan: Plan, reason: str) -> None:
        """Tell every stage of ``plan`` to drop ``rid`` and free what it holds (never blocks;
        a stage that is gone simply does not get it)."""
        targets = {plan.prefill.inbox, plan.decode.inbox}
        encoders = set(plan.encoders) | plan.holders
        targets.update(self.router.by_id[e].inbox for e in encoders if e in self.router.by_id)
        logger.info("request %s: aborting in %d stage(s): %s", rid, len(targets), reason)
        for address in targets:
            self.client.send_nowait(address, pb.AbortRequest(request_id=rid, reason=reason))
