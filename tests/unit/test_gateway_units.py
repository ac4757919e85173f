import asyncio
import base64
import io

import pytest
from PIL import Image

from epd.registry.registry import InstanceInfo
from epd.wire.gen import epd_pb2 as pb
from services.gateway.media import MediaError, check_image_bytes, load_image_url
from services.gateway.protocol import ApiError
from services.gateway.router import NoInstance, Router
from services.gateway.stream import TokenStream


def _png(w=32, h=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_media_hash_and_header_size():
    data = _png(32, 16)
    img = load_image_url("data:image/png;base64," + base64.b64encode(data).decode(), 10_000)
    assert (img.width, img.height) == (32, 16)
    import hashlib

    assert img.mm_hash == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("bad", [
    b"not an image at all",
    _png()[:40],                # truncated PNG
    b"",
])
def test_media_rejects_non_images_and_truncation(bad):
    with pytest.raises(MediaError):
        check_image_bytes(bad, 10_000)


def test_media_rejects_too_many_pixels_before_decoding():
    with pytest.raises(MediaError, match="exceeds"):
        check_image_bytes(_png(200, 100), 10_000)


def test_media_rejects_bad_urls():
    with pytest.raises(MediaError):
        load_image_url("http://example.invalid/a.png", 10)
    with pytest.raises(MediaError):
        load_image_url("data:image/png;base64,@@@", 10)


def _inst(iid, role, **load):
    cap = {"block_size": 16} if role == "decode" else {}
    return InstanceInfo(iid, [role], f"tcp://{iid}", capacity=cap, load=load)


def test_router_least_loaded_with_inflight_and_room():
    r = Router()
    r.update([
        _inst("e0", "encoder", queued_patches=0), _inst("e1", "encoder", queued_patches=0),
        _inst("p0", "prefill", queued_tokens=100), _inst("p1", "prefill", queued_tokens=0),
        _inst("d0", "decode", running=0, free_blocks=1), _inst("d1", "decode", running=5, free_blocks=100),
    ])
    plan = r.plan(num_prompt_tokens=40, max_tokens=10, image_patches=[64, 64])
    assert plan.route == "encode"
    assert plan.prefill.instance_id == "p1"
    assert plan.decode.instance_id == "d1"  # d0 is idle but has no room for 50 tokens
    assert plan.encoders == {"e0": [0], "e1": [1]}  # split across encoders
    assert r.inflight["p1"] == 40
    r.release(plan)
    assert r.inflight["p1"] == 0 and r.inflight["e0"] == 0
    text = r.plan(5, 5, [])
    assert text.route == "text" and text.encoders == {}


def test_router_no_instance():
    r = Router()
    r.update([_inst("p0", "prefill")])
    with pytest.raises(NoInstance, match="decode"):
        r.plan(5, 5, [])


def test_token_stream_reorders_and_finishes():
    async def run():
        q = asyncio.Queue()
        q.put_nowait(("token_delta", pb.TokenDelta(request_id="r", token_ids=[8], offset=1)))
        q.put_nowait(("token_delta", pb.TokenDelta(request_id="r", token_ids=[7], offset=0)))
        q.put_nowait(("token_delta", pb.TokenDelta(request_id="r", token_ids=[9], offset=2, finished=True,
                                                   finish_reason="length")))
        s = TokenStream(q, deadline=asyncio.get_running_loop().time() + 5)
        got = [ids async for ids in s]
        return got, s.token_ids, s.finish_reason

    got, ids, reason = asyncio.run(run())
    assert got == [[7], [8], [9]] and ids == [7, 8, 9] and reason == "length"


def test_token_stream_maps_failures_and_timeouts():
    import time

    async def failed():
        q = asyncio.Queue()
        q.put_nowait(("request_failed", pb.RequestFailed(request_id="r", code=pb.TIMEOUT, stage="decode")))
        await TokenStream(q, deadline=time.monotonic() + 5).next()

    with pytest.raises(ApiError) as exc:
        asyncio.run(failed())
    assert exc.value.status == 504

    async def silent():
        await TokenStream(asyncio.Queue(), deadline=time.monotonic() + 0.05).next()

    with pytest.raises(ApiError) as exc:
        asyncio.run(silent())
    assert exc.value.status == 504


def test_router_cached_and_mixed_routes_skip_encoders():
    r = Router()
    r.update([_inst("e0", "encoder"), _inst("e1", "encoder"), _inst("p0", "prefill"),
              _inst("d0", "decode", running=0, free_blocks=100)])
    cached = r.plan(40, 8, [64, 64], cached={0, 1})
    assert cached.route == "cached" and cached.encoders == {} and cached.cached == [0, 1]
    mixed = r.plan(40, 8, [64, 16, 64], cached={1})
    assert mixed.route == "mixed" and mixed.encoders == {"e0": [0], "e1": [2]} and mixed.cached == [1]


def test_router_cached_route_needs_no_encoder():
    r = Router()
    r.update([_inst("p0", "prefill"), _inst("d0", "decode", running=0, free_blocks=100)])
    assert r.plan(10, 4, [64], cached={0}).route == "cached"
    with pytest.raises(NoInstance, match="encoder"):
        r.plan(10, 4, [64])


def test_router_release_at_first_token_then_end():
    r = Router()
    r.update([_inst("e0", "encoder"), _inst("p0", "prefill"), _inst("d0", "decode", running=0, free_blocks=10)])
    plan = r.plan(40, 8, [64])  # decode: ceil(48 / 16) = 3 blocks
    assert (r.inflight["e0"], r.inflight["p0"], r.inflight["d0"], r.inflight_blocks["d0"]) == (64, 40, 1, 3)
    r.release(plan, ("encoder", "prefill"))  # first token
    assert (r.inflight["e0"], r.inflight["p0"], r.inflight["d0"]) == (0, 0, 1)
    r.release(plan)
    r.release(plan)  # idempotent
    assert r.inflight["d0"] == 0 and r.inflight_blocks["d0"] == 3
    r.release_blocks(plan)
    assert r.inflight_blocks["d0"] == 0


def test_router_decode_room_counts_inflight_blocks_and_saturation():
    r = Router()
    r.update([_inst("p0", "prefill"), _inst("d0", "decode", running=0, free_blocks=5),
              _inst("d1", "decode", running=3, free_blocks=4)])
    first = r.plan(60, 4, [])  # 4 blocks: d0 (less running)
    assert first.decode.instance_id == "d0"
    second = r.plan(60, 4, [])  # d0 has 5 - 4 = 1 block left: d1 despite more running
    assert second.decode.instance_id == "d1"
    with pytest.raises(NoInstance) as exc:
        r.plan(60, 4, [])
    assert exc.value.saturated and exc.value.role == "decode"
    r.release_blocks(first)
    assert r.plan(60, 4, []).decode.instance_id == "d0"


def test_router_balances_by_inflight_between_refreshes():
    r = Router()
    r.update([_inst("p0", "prefill"), _inst("d0", "decode", running=0, free_blocks=1000),
              _inst("d1", "decode", running=0, free_blocks=1000)])
    picks = [r.plan(10, 4, []).decode.instance_id for _ in range(10)]
    assert picks.count("d0") == picks.count("d1") == 5


def test_router_dead_instance_never_chosen():
    r = Router()
    r.update([_inst("p0", "prefill"), _inst("d0", "decode", running=9, free_blocks=100),
              _inst("d1", "decode", running=0, free_blocks=100)])
    r.update([_inst("p0", "prefill"), _inst("d0", "decode", running=9, free_blocks=100)])  # d1's TTL expired
    assert {r.plan(10, 4, []).decode.instance_id for _ in range(3)} == {"d0"}
    assert not r.is_live("d1")


def test_token_stream_records_receipt_time():
    async def run():
        q = asyncio.Queue()
        q.put_nowait(("token_delta", pb.TokenDelta(request_id="r", token_ids=[7], offset=0, finished=True,
                                                   finish_reason="stop"), 12.5))
        s = TokenStream(q, deadline=asyncio.get_running_loop().time() + 5)
        await s.next()
        return s.received_at

    assert asyncio.run(run()) == 12.5


def test_router_suspicion_is_of_one_incarnation_and_expires(monkeypatch):
    import services.gateway.router as router_mod

    clock = [100.0]
    monkeypatch.setattr(router_mod.time, "monotonic", lambda: clock[0])
    d0, d1 = _inst("d0", "decode", free_blocks=100), _inst("d1", "decode", running=5, free_blocks=100)
    d0.incarnation, d1.incarnation = "a", "x"
    r = Router()
    r.update([_inst("p0", "prefill"), d0, d1])
    assert r.plan(10, 4, []).decode.instance_id == "d0"
    assert not r.suspect("d0", "old-life", 10.0)  # a life that is over: nothing to suspect
    assert r.suspect("d0", "a", 10.0)
    assert r.plan(10, 4, []).decode.instance_id == "d1" and not r.is_usable("d0") and r.is_live("d0")
    clock[0] += 11.0  # wrongly suspected: usable again after the while
    r.update([_inst("p0", "prefill"), d0, d1])
    assert r.is_usable("d0")
    assert r.suspect("d0", "a", 10.0)
    restarted = _inst("d0", "decode", free_blocks=100)
    restarted.incarnation = "b"  # a new life under the same id is usable at once
    r.update([_inst("p0", "prefill"), restarted, d1])
    assert r.is_usable("d0") and r.plan(10, 4, []).decode.instance_id == "d0"
    draining = _inst("d1", "decode", free_blocks=100)
    draining.draining = True
    r.update([_inst("p0", "prefill"), draining])
    assert r.is_live("d1") and not r.is_usable("d1")
