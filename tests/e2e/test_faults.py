"""Faults a disaggregated deployment multiplies, on real processes (loopback, real Redis,
Mooncake over TCP, the tiny model), each bounded in time:

- kill -9 of each role before the first token, with a sibling: retried there, token-exact;
- kill -9 of the decode mid-stream: migrated to the other decode, one seamless stream, token-exact;
- SIGSTOP of a decode: its requests are retried elsewhere; once resumed it frees what it held;
- a gateway killed mid-stream and restarted: decode frees the orphaned stream, serving goes on;
- Redis restarted under traffic: nothing fails;
- a well-formed message with an invalid ``reply_to`` to each role: the role survives;
- with ``EPD_CLUSTER_SECRET``: forged TokenDelta / RequestFailed / AbortRequest and a forged
  registry entry are ignored, the victim's stream is unchanged;
- with one instance per role: kill -9 gives a clean error, then the role comes back.

After each: no KV block, staging byte or queued image left (the published loads).
Time bounds are generous (2 cores): the measured figures live in ``benchmarks/faults.py``.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest
import redis
import zmq

from epd.registry.registry import InstanceInfo
from epd.wire.auth import Signer
from epd.wire.gen import epd_pb2 as pb
from epd.wire.sockets import Inbox, Outbox
from tests.conftest import free_port, start_redis
from tests.e2e.chaos import ClientRequest, instance, leaks, results, wait_for
from tests.e2e.cluster import start_cluster
from tests.e2e.http import user_message
from tests.model_fixtures import sample_photos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SECRET = "fault-tests-cluster-secret-0123456789"
TTL_S = 2.0
BOUND_S = 2 * TTL_S + 8  # 2x TTL, plus a re-encode / re-prefill and slack for 2 loaded cores
TEXT = "Tell me something about the garden in spring."
FAST = {"EPD_HEARTBEAT_S": "0.5", "EPD_INSTANCE_TTL_S": str(TTL_S), "EPD_REGISTRY_REFRESH_S": "0.2",
        "EPD_SEND_TIMEOUT_S": "1"}


@pytest.fixture(scope="module")
def hf(hf_reference):
    """Greedy ids of HF ``generate()`` for (images, text, max_new_tokens)."""
    return lambda images, text, n: hf_reference.greedy(images, text, n)[1]


@pytest.fixture(scope="module")
def photos():
    base = sample_photos()["chelsea"]
    # a fresh image per use, so no test rides on another's feature-cache entry
    return [base.crop((i * 7, i * 5, i * 7 + 300, i * 5 + 280)) for i in range(12)]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A Redis of this module's own, so one test can restart it."""
    port, workdir = free_port(), tmp_path_factory.mktemp("fault-redis")
    box = {"proc": start_redis(port, workdir), "port": port, "dir": workdir}
    yield box
    box["proc"].kill()
    box["proc"].wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server, tiny_model):
    """2 encoders, 2 prefills, 2 decodes, one gateway; the cluster secret set."""
    url = f"redis://127.0.0.1:{redis_server['port']}/0"
    c = start_cluster(tmp_path_factory.mktemp("faults"), url, tiny_model, encoders=2, prefills=2, decodes=2,
                      extra_env={**FAST, "EPD_CLUSTER_SECRET": SECRET})
    yield c
    codes = c.stop()
    assert all(p.poll() is not None for p in c.procs.values()), codes


def _chat(images: list, text: str, n: int, stream: bool = False) -> dict:
    return {"messages": user_message(images, text), "max_tokens": n, "temperature": 0, "return_token_ids": True,
            "stream": stream}


def _respawn(c, name: str) -> None:
    """Start ``name`` again and wait until its new incarnation is registered."""
    old = c.procs[name]
    if old.poll() is None:
        old.kill()
    old.wait()
    c.spawn(name)
    wait_for(lambda: (i := instance(c.registry, name)) and i.pid == c.procs[name].pid, 60,
             what=f"{name} to register again")


def _settled(c) -> None:
    wait_for(lambda: not leaks(c.registry), 15, what="every stage to free what it held")


def _gateway_log_has(c, rid: str, text: str) -> bool:
    return any(rid in line and text in line for line in c.log("gateway").splitlines())


@pytest.mark.parametrize("role", ["encoder", "prefill", "decode"])
def test_kill9_before_first_token_is_retried_on_the_sibling(cluster, hf, photos, role):
    victim = cluster.procs[f"{role}-0"]  # the router breaks load ties by instance id: the -0 gets it
    idx = ["encoder", "prefill", "decode"].index(role)
    # warm up: every link to the victim is connected, so the request below is really accepted
    # by the stopped process and lost with it (not refused at the gateway's send)
    assert ClientRequest(f"{cluster.url}/v1/chat/completions", _chat([photos[9]], "Hi.", 2)).result(60).status == 200
    _settled(cluster)
    time.sleep(1.0)  # the gateway's view shows every load back at 0: the tie-break decides
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        req = ClientRequest(f"{cluster.url}/v1/chat/completions", _chat([photos[idx]], "Describe it.", 12))
        time.sleep(1.0)  # the request is now waiting on the stopped instance
        t_kill = time.monotonic()
        victim.kill()
        out = req.result(60)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert out.status == 200, out.error
    assert out.token_ids == hf([photos[idx]], "Describe it.", 12)
    assert out.t_end - t_kill < BOUND_S
    assert _gateway_log_has(cluster, out.rid, "retry"), f"{role}-0 was never on the request's path"
    _respawn(cluster, f"{role}-0")
    _settled(cluster)


def test_decode_killed_mid_stream_migrates_token_exact(cluster, hf):
    n = 160
    req = ClientRequest(f"{cluster.url}/v1/chat/completions", _chat([], TEXT, n, stream=True), after_tokens=6)
    assert req.first_tokens.wait(60)
    rid = req.out.rid
    line = next(ln for ln in cluster.log("gateway").splitlines() if f"request {rid}: route" in ln)
    name = line.rsplit("decode ", 1)[1].strip()
    victim = cluster.procs[name]
    os.kill(victim.pid, signal.SIGSTOP)  # freeze it mid-stream, then kill it
    victim.kill()
    out = req.result(60)
    assert out.status == 200 and out.error is None, out.error
    assert out.done and out.finish_reason == "length"
    assert out.token_ids == hf([], TEXT, n)  # one seamless, token-exact stream
    assert _gateway_log_has(cluster, rid, "migration as")
    gaps = [b - a for a, b in zip(out.chunk_times, out.chunk_times[1:], strict=False)]
    assert max(gaps) < BOUND_S  # the stall while the decode was gone
    _respawn(cluster, name)
    _settled(cluster)


def test_sigstop_decode_is_routed_around_and_frees_on_resume(cluster, hf, photos):
    victim = cluster.procs["decode-0"]
    _settled(cluster)
    time.sleep(1.0)  # the gateway's view shows every load back at 0: the tie-break picks decode-0
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        out = ClientRequest(f"{cluster.url}/v1/chat/completions", _chat([], "Say something.", 8)).result(60)
        assert out.status == 200 and out.token_ids == hf([], "Say something.", 8), out.error
        assert _gateway_log_has(cluster, out.rid, "retry"), "decode-0 was never on the request's path"
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    wait_for(lambda: instance(cluster.registry, "decode-0"), 15, what="decode-0 to beat again")
    assert victim.poll() is None
    _settled(cluster)  # the aborted reservation it held while stopped is freed


def test_gateway_killed_mid_stream_then_restarted(cluster, hf):
    req = ClientRequest(f"{cluster.url}/v1/chat/completions", _chat([], TEXT, 160, stream=True), after_tokens=4)
    assert req.first_tokens.wait(60)
    cluster.procs["gateway"].kill()
    out = req.result(30)
    assert not out.done  # the client saw the connection go
    _settled(cluster)  # decode stopped streaming to nobody and freed the blocks
    cluster.procs["gateway"].wait()
    cluster.spawn("gateway")
    from epd.launcher import gateway_ready

    wait_for(lambda: gateway_ready(cluster.url, {"encoder": 2, "prefill": 2, "decode": 2}), 60, what="gateway")
    t0 = time.monotonic()
    out = ClientRequest(f"{cluster.url}/v1/chat/completions", _chat([], TEXT, 40)).result(60)
    assert out.status == 200 and out.token_ids == hf([], TEXT, 40)
    assert time.monotonic() - t0 < 20  # no stage is stuck on the old gateway


def test_redis_restart_under_traffic(cluster, redis_server, hf):
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    reqs = [ClientRequest(f"{cluster.url}/v1/chat/completions", _chat([], TEXT, 60, stream=bool(i % 2)))
            for i in range(6)]
    time.sleep(0.3)
    redis_server["proc"].kill()
    redis_server["proc"].wait()
    time.sleep(1.0)
    redis_server["proc"] = start_redis(redis_server["port"], redis_server["dir"])
    reqs += [ClientRequest(f"{cluster.url}/v1/chat/completions", _chat([], TEXT, 20)) for _ in range(4)]
    outs = results(reqs, 90, lambda: {name: cluster.log(name) for name in cluster.procs}, since)
    assert [o.status for o in outs] == [200] * len(outs), [o.error for o in outs]
    assert all(o.error is None for o in outs)
    assert all(o.token_ids == hf([], TEXT, len(o.token_ids)) for o in outs)
    wait_for(lambda: len(cluster.registry.instances()) == 7, 15, what="every instance to register again")
    _settled(cluster)


def _signed_outbox() -> Outbox:
    return Outbox(zmq.Context.instance(), "gateway-0", signer=Signer(SECRET.encode()), send_timeout_ms=1000)


@pytest.mark.parametrize("role", ["encoder", "prefill", "decode"])
def test_invalid_reply_to_fails_one_request_not_the_stage(cluster, hf, photos, role):
    import io

    info = instance(cluster.registry, f"{role}-0")
    out = _signed_outbox()
    bad = "not-a-zeromq-endpoint"
    if role == "encoder":
        buf = io.BytesIO()
        photos[11].save(buf, format="PNG")
        item = pb.ImageItem(mm_hash="ab" * 32, index=0, width=photos[11].width, height=photos[11].height,
                            num_tokens=1, grid_thw=[1, 2, 2], blob_index=0)
        msg = pb.EncodeRequest(request_id="bad-e", images=[item], prefill_instance="x", prefill_inbox=bad,
                               reply_to=bad)
        out.send(info.inbox, msg, [buf.getvalue()]).result(5)
    elif role == "prefill":
        out.send(info.inbox, pb.PrefillRequest(request_id="bad-p", prompt_token_ids=[1, 2, 3], decode_inbox=bad,
                                               reply_to=bad, sampling=pb.SamplingParams(max_tokens=2))).result(5)
    else:
        out.send(info.inbox, pb.KvAllocRequest(request_id="bad-d", num_tokens=5, max_new_tokens=2,
                                               reply_to=bad)).result(5)
    out.close()
    time.sleep(2.0)
    assert cluster.procs[f"{role}-0"].poll() is None
    images = [photos[10]] if role == "encoder" else []
    ok = ClientRequest(f"{cluster.url}/v1/chat/completions", _chat(images, "Describe it.", 6)).result(60)
    assert ok.status == 200 and ok.token_ids == hf(images, "Describe it.", 6)
    _settled(cluster)


def test_forged_messages_and_registry_entries_are_ignored(cluster, hf):
    gw = next(i for i in cluster.registry.instances() if "gateway" in i.roles)
    evil_inbox = Inbox(zmq.Context.instance(), "127.0.0.1")
    raw = redis.Redis.from_url(cluster.redis_url)
    forged = InstanceInfo("evil-p", ["prefill"], evil_inbox.address, load={"queued_tokens": -1e9})
    raw.set("epd:inst:evil-p", json.dumps(forged.__dict__), px=60_000)  # unsigned: must be ignored

    n = 120
    req = ClientRequest(f"{cluster.url}/v1/chat/completions", _chat([], TEXT, n, stream=True), after_tokens=2)
    assert req.first_tokens.wait(60)
    rid = req.out.rid
    unsigned = Outbox(zmq.Context.instance(), "decode-0")
    wrong_key = Outbox(zmq.Context.instance(), "decode-0", signer=Signer(b"another-secret-of-enough-bytes"))
    member_as_stranger = Outbox(zmq.Context.instance(), "encoder-1", signer=Signer(SECRET.encode()))
    for out in (unsigned, wrong_key, member_as_stranger):
        out.send(gw.inbox, pb.TokenDelta(request_id=rid, token_ids=[7] * 50, offset=2, finished=True,
                                         finish_reason="stop", stage="decode"))
        out.send(gw.inbox, pb.RequestFailed(request_id=rid, code=pb.INVALID_REQUEST, message="forged"))
    for info in cluster.registry.instances():
        if "decode" in info.roles:  # unsigned aborts to every decode
            unsigned.send(info.inbox, pb.AbortRequest(request_id=rid, reason="forged"))
    out = req.result(60)
    for o in (unsigned, wrong_key, member_as_stranger):
        o.close()
    assert out.status == 200 and out.error is None, out.error
    assert out.token_ids == hf([], TEXT, n)  # the victim's stream is unchanged

    for _ in range(3):  # the forged instance is never chosen, though it claims no load at all
        ok = ClientRequest(f"{cluster.url}/v1/chat/completions", _chat([], TEXT, 4)).result(60)
        assert ok.status == 200
    assert evil_inbox.recv(200) is None
    with open(cluster.logs["gateway"]) as fh:
        log = fh.read()
    assert "rejected" in log
    with urllib.request.urlopen(f"{cluster.url}/metrics") as resp:
        metrics = resp.read().decode().splitlines()
    rejected = next(float(ln.split()[-1]) for ln in metrics if ln.startswith("epd_messages_rejected_total"))
    assert rejected >= 6  # 3 forged TokenDeltas + 3 forged RequestFailed
    raw.delete("epd:inst:evil-p")
    evil_inbox.close()
    _settled(cluster)


# -- one instance per role --------------------------------------------------------------------

@pytest.fixture(scope="module")
def single(tmp_path_factory, redis_url, tiny_model):
    url = redis_url.rsplit("/", 1)[0] + "/5"
    redis.Redis.from_url(url).flushdb()
    c = start_cluster(tmp_path_factory.mktemp("single"), url, tiny_model, extra_env=FAST)
    yield c
    c.stop()


@pytest.mark.parametrize("role", ["encoder", "prefill", "decode"])
def test_single_instance_kill9_gives_a_clean_error_then_recovers(single, hf, photos, role):
    victim = single.procs[f"{role}-0"]
    images = [photos[3 + ["encoder", "prefill", "decode"].index(role)]]
    if role == "decode":  # mid-stream: an error event after the tokens already sent
        req = ClientRequest(f"{single.url}/v1/chat/completions", _chat([], TEXT, 160, stream=True), after_tokens=4)
        assert req.first_tokens.wait(60)
        os.kill(victim.pid, signal.SIGSTOP)
    else:  # before the first token: an error response
        os.kill(victim.pid, signal.SIGSTOP)
        req = ClientRequest(f"{single.url}/v1/chat/completions", _chat(images, "Describe it.", 8))
        time.sleep(1.0)
    t_kill = time.monotonic()
    victim.kill()
    out = req.result(60)
    assert out.t_end - t_kill < BOUND_S
    assert out.error is not None and out.error["type"] == "service_unavailable", out.error
    if role == "decode":
        assert out.status == 200 and out.done and len(out.token_ids) >= 4  # error event, then [DONE]
    else:
        assert out.status == 503
    _respawn(single, f"{role}-0")
    from epd.launcher import gateway_ready

    wait_for(lambda: gateway_ready(single.url, {"encoder": 1, "prefill": 1, "decode": 1}), 30, what="gateway view")
    ok = wait_for(lambda: (o := ClientRequest(f"{single.url}/v1/chat/completions",
                                              _chat(images, "Describe it.", 8)).result(60)).status == 200 and o,
                  30, period=0.5, what="serving again")
    assert ok.token_ids == hf(images, "Describe it.", 8)
    _settled(single)
