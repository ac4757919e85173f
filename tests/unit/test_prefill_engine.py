"""PrefillEngine in process: add / abort / step outputs, load records, prefetch buffers, the KV
connector calls per layer (a fake connector), and the one-sided KvSender over shared memory."""

from __future__ import annotations

import math
import time

import pytest
import torch

from epd.engine.kv_pool import KvLayout, KvPool
from epd.engine.region_alloc import RangeAllocator, RegionFull
from epd.engine.sampling import SamplingParams
from epd.transfer import create_backend
from services.prefill.engine import PrefillEngine
from services.prefill.feature_reader import LocalFeatureReader, OneSidedFeatureReader
from services.prefill.kv_connector import KvConnector, KvSlot, SaveResult
from services.prefill.kv_sender import KvSender
from services.prefill.records import FeatureRef, KvTarget, PrefillRequest

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 4, 2, 4, 32
IMG = 99  # placeholder token id of the fake model
EOS = 0


class FakeAdapter:
    """Prompt inputs of a toy model: one embedding column, image rows must match placeholders."""

    num_layers, num_kv_heads, head_dim, dtype, eos_token_ids = LAYERS, KV_HEADS, HEAD_DIM, torch.float32, (EOS,)

    def prompt_inputs(self, ids, features, grids):
        if sum(f.shape[0] for f in features) != ids.count(IMG):
            raise ValueError("image placeholders do not match the features")
        embeds = torch.tensor(ids, dtype=torch.float32)[:, None]
        n = len(ids)
        return embeds, torch.arange(n)[None].expand(3, n), -len(features)


class FakeRunner:
    """Prefill forward of the toy model: K = layer + token position, V = -K; the next token is
    (last prompt id + 1) mod VOCAB."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def prefill(self, embeds, positions, seq_lens, on_layer=None):
        self.calls.append(list(seq_lens))
        t = embeds.shape[0]
        for layer in range(LAYERS):
            k = torch.arange(t, dtype=torch.float32)[:, None, None].expand(t, KV_HEADS, HEAD_DIM) + layer
            on_layer(layer, k, -k)
        ends = torch.tensor(seq_lens).cumsum(0) - 1
        nxt = (embeds[ends, 0].long() + 1) % VOCAB
        return torch.nn.functional.one_hot(nxt, VOCAB).float()


class RecordingConnector(KvConnector):
    """Records the engine's connector calls; fails the requests named in ``fail``."""

    def __init__(self, fail: dict[str, str] | None = None, full: bool = False) -> None:
        self.fail, self.full = fail or {}, full
        self.batches: list[list[KvSlot]] = []
        self.layers: list[tuple[int, tuple[int, ...]]] = []
        self.waits = self.aborts = 0

    def start_batch(self, slots):
        if self.full:
            raise RegionFull("no staging")
        self.batches.append(list(slots))

    def save_kv_layer(self, layer, k, v):
        assert torch.equal(v, -k)
        self.layers.append((layer, tuple(k.shape)))

    def wait_for_save(self):
        self.waits += 1
        return SaveResult(123, 0.0, dict(self.fail))

    def abort_batch(self):
        self.aborts += 1


LAYOUT = KvLayout(LAYERS, 16, 4, KV_HEADS, HEAD_DIM)
TARGET = KvTarget("decode-pool", LAYOUT, (3, 4, 7, 8), "decode-0")


def _req(rid: str, ids: list[int], images: int = 0, deadline: float = math.inf, **sampling) -> PrefillRequest:
    return PrefillRequest(rid, ids, images, SamplingParams(**sampling), deadline, ctx={"from": "test"})


def _engine(kv=None, reader=None, max_tokens: int = 64, staging=None):
    runner = FakeRunner()
    kv = kv or RecordingConnector()
    engine = PrefillEngine(FakeAdapter(), kv, reader or LocalFeatureReader({}), max_tokens, staging=staging,
                           runner=runner)
    return engine, runner, kv


def test_text_request_first_token_then_handoff_and_load():
    engine, runner, kv = _engine()
    engine.add(_req("a", [5, 6, 7], max_tokens=8))
    out = engine.step()
    assert out.first_tokens == [] and not out.busy  # no decode blocks yet
    assert (out.load.queued_requests, out.load.queued_tokens, out.load.inflight) == (1, 3, 1)
    assert engine.set_kv_target("a", TARGET) and not engine.set_kv_target("nobody", TARGET)
    out = engine.step()
    assert [(f.request.request_id, f.token_id, f.finish_reason) for f in out.first_tokens] == [("a", 8, None)]
    assert out.first_tokens[0].request.ctx == {"from": "test"} and out.first_tokens[0].logits is None
    assert out.handoffs == [] and out.busy and out.load.inflight == 1  # KV still being saved
    assert kv.batches == [[KvSlot("a", TARGET, 0, 3)]] and kv.waits == 0
    assert kv.layers == [(layer, (3, KV_HEADS, HEAD_DIM)) for layer in range(LAYERS)]  # one call per layer, in order
    out = engine.step()
    assert [(h.request.request_id, h.first_token_id, h.rope_delta) for h in out.handoffs] == [("a", 8, 0)]
    assert kv.waits == 1 and out.kv_bytes == 123 and out.releases == [] and out.failed == []
    assert out.load.inflight == 0 and not out.busy and not engine.has_request("a")


def test_packed_batch_respects_token_budget_in_arrival_order():
    engine, runner, kv = _engine(max_tokens=10)
    for rid, n in (("a", 5), ("b", 4), ("c", 8)):
        engine.add(_req(rid, [1] * n, max_tokens=4))
        engine.set_kv_target(rid, TARGET)
    assert engine.step().load.queued_tokens == 17
    assert runner.calls == [[5, 4]]
    assert [(s.request_id, s.start, s.length) for s in kv.batches[0]] == [("a", 0, 5), ("b", 5, 4)]
    assert [h.request.request_id for h in engine.step().handoffs] == ["a", "b"]
    engine.step()
    assert runner.calls == [[5, 4], [8]] and kv.batches[1] == [KvSlot("c", TARGET, 0, 8)]


def test_first_token_eos_or_length_releases_decode_blocks():
    engine, _, _ = _engine()
    engine.add(_req("eos", [3, VOCAB - 1], max_tokens=8))  # next token wraps to 0 = EOS
    engine.add(_req("one", [3, 4], max_tokens=1))
    for rid in ("eos", "one"):
        engine.set_kv_target(rid, TARGET)
    first = engine.step().first_tokens
    assert [(f.token_id, f.finish_reason) for f in first] == [(EOS, "stop"), (5, "length")]
    out = engine.step()
    assert out.handoffs == []
    assert [(r.request.request_id, r.reason) for r in out.releases] == [("eos", "finished in prefill"),
                                                                         ("one", "finished in prefill")]


def test_kv_write_failure_fails_request_and_releases_blocks():
    engine, _, _ = _engine(kv=RecordingConnector(fail={"a": "peer gone"}))
    engine.add(_req("a", [1, 2], max_tokens=4))
    engine.set_kv_target("a", TARGET)
    engine.step()
    out = engine.step()
    assert out.handoffs == []
    [failure] = out.failed
    assert (failure.code, failure.message, failure.peer, failure.release_decode) == (
        "UNAVAILABLE", "KV transfer to decode failed: peer gone", "decode-0", False)
    assert [r.reason for r in out.releases] == ["kv failed"]


def test_abort_while_saving_suppresses_handoff():
    engine, _, kv = _engine()
    engine.add(_req("a", [1, 2], max_tokens=4))
    engine.set_kv_target("a", TARGET)
    engine.step()
    assert engine.abort("a") and not engine.has_request("a") and engine.load().inflight == 0
    out = engine.step()
    assert kv.waits == 1 and out.handoffs == [] and out.releases == [] and out.failed == []
    assert not engine.abort("a")


def test_timeout_bad_layout_bad_prompt_and_no_staging_fail_with_codes():
    engine, _, _ = _engine()
    engine.add(_req("late", [1], deadline=100.0))
    engine.add(_req("layout", [1]))
    engine.set_kv_target("layout", KvTarget("x", KvLayout(LAYERS + 1, 4, 4, KV_HEADS, HEAD_DIM), (0,)))
    engine.add(_req("prompt", [1, IMG]))  # a placeholder but no image announced
    engine.set_kv_target("prompt", TARGET)
    out = engine.step(now=200.0)
    assert {(f.request.request_id, f.code) for f in out.failed} == {
        ("late", "TIMEOUT"), ("layout", "INTERNAL"), ("prompt", "INVALID_REQUEST")}
    assert engine.load().queued_requests == 0

    engine, _, kv = _engine(kv=RecordingConnector(full=True))
    engine.add(_req("a", [1]))
    engine.set_kv_target("a", TARGET)
    [failure] = engine.step().failed
    assert failure.code == "OUT_OF_CAPACITY" and failure.release_decode and kv.aborts == 1


def test_features_before_request_are_kept_and_read():
    feats = torch.arange(6, dtype=torch.float32).view(3, 2)
    region = feats.view(-1).view(torch.uint8).clone()
    engine, runner, _ = _engine(reader=LocalFeatureReader({"enc": region}))
    ref = FeatureRef(0, "enc", 0, region.numel(), "float32", (3, 2), (1, 2, 6), "encoder-0")
    engine.add_features("a", ref)  # FeaturesReady raced ahead of the PrefillRequest
    assert engine.orphans and engine.load().queued_requests == 0
    engine.add(_req("a", [1, IMG, IMG, IMG, 2], images=1))
    engine.set_kv_target("a", TARGET)
    assert engine.load().features_pending == 1
    assert len(engine.step().first_tokens) == 1 and runner.calls == [[5]]
    assert not engine.orphans


def test_abort_releases_feature_staging_and_failed_read_names_the_encoder():
    with create_backend("shm") as enc, create_backend("shm") as pre:
        pool = enc.allocate(4096, "features")
        pool.tensor[:1024].copy_(torch.arange(256, dtype=torch.float32).view(torch.uint8))
        region = pre.allocate(8192, "prefill")
        staging = RangeAllocator(region.nbytes)
        reader = OneSidedFeatureReader(pre, region, staging)
        engine, _, _ = _engine(reader=reader, staging=staging)
        ref = FeatureRef(0, pool.handle, 0, 1024, "float32", (256,), (1, 16, 16), "encoder-0")
        engine.add(_req("a", [1], images=1))
        engine.add_features("a", ref)
        assert engine.load().staging_used_bytes == 1024 and engine.load().features_pending == 1
        assert engine.abort("a")
        for _ in range(200):  # freed once the read has settled (it may still land bytes there)
            engine.step()
            if staging.used_bytes == 0:
                break
            time.sleep(0.01)
        assert engine.load().staging_used_bytes == 0 and staging.used_bytes == 0 and reader.parked == []

        engine.add(_req("b", [1], images=1))
        engine.add_features("b", FeatureRef(0, pool.handle, 4000, 1024, "float32", (256,), (1, 16, 16),
                                            "encoder-0"))  # past the end of the encoder's pool
        [failure] = engine.step().failed
        assert (failure.code, failure.peer) == ("UNAVAILABLE", "encoder-0")
        assert "cannot read features of image 0" in failure.message and staging.used_bytes == 0

        engine.add(_req("c", [1], images=1))
        engine.add_features("c", FeatureRef(0, pool.handle, 0, 1 << 20, "float32", (1 << 18,), (1, 1, 1), "e"))
        [failure] = engine.step().failed
        assert failure.code == "OUT_OF_CAPACITY" and failure.message.startswith("prefill buffer full")


@pytest.mark.parametrize("group, writes", [(0, 0), (1, 4), (3, 2), (4, 1)])
def test_kv_sender_ships_per_layer_group_into_decode_blocks(group, writes):
    """``writes``: WRITEs submitted per request during the forward (G = 0: all after it)."""
    layout = KvLayout(LAYERS, 16, 4, KV_HEADS, HEAD_DIM)
    with create_backend("shm") as p_side, create_backend("shm") as d_side:
        d_region = d_side.allocate(layout.nbytes, "kv")
        region = p_side.allocate(1 << 16, "prefill")
        staging = RangeAllocator(region.nbytes)
        sender = KvSender(p_side, region, staging, LAYERS, group)
        engine, _, _ = _engine(kv=sender, staging=staging)
        target = KvTarget(d_region.handle, layout, (9, 10, 2, 5), "decode-0")
        engine.add(_req("a", [1, 2, 3], max_tokens=4))
        engine.add(_req("b", [4, 5, 6, 7, 8, 9], max_tokens=4))
        engine.set_kv_target("a", KvTarget(d_region.handle, layout, (0,), "decode-0"))
        engine.set_kv_target("b", target)
        engine.step()
        assert [len(e.futures) for e in sender.entries] == [writes, writes]  # one write per group submitted
        assert staging.used_bytes > 0
        out = engine.step()
        assert [h.request.request_id for h in out.handoffs] == ["a", "b"] and out.kv_bytes > 0
        assert staging.used_bytes == 0
        kv = KvPool(layout, d_region.tensor).gather([9, 10], 6)  # b: packed tokens 3..8
        for layer, (k, v) in enumerate(kv):
            want = (torch.arange(3, 9, dtype=torch.float32) + layer)[None, :, None].expand(KV_HEADS, 6, HEAD_DIM)
            assert torch.equal(k, want) and torch.equal(v, -want)
