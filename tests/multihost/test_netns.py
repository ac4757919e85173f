"""Cross-host serving with real network stacks: every stage on a host of its own (issue #12).

The hosts are Linux network namespaces on one bridge (:mod:`tests.multihost.netns`): Redis and
the gateway on ``gw``, the encoder on ``enc``, prefill on ``pre``, decodes on ``dec0`` and
``dec1``; the test itself (client, HF reference) is a host too, in the root namespace. Every
process binds and advertises its host's address (``EPD_HOST`` = ``EPD_ADVERTISE_HOST``), the
cluster secret is on, and Mooncake (TCP) moves features encoder → prefill and KV prefill →
decode across the veth links. Checked here:

- real photographs served token-exact against HF ``generate()``;
- the feature and KV bytes cross the links they should (kernel counters of each host's NIC
  against the payload computed from the model config), and KV never passes the gateway;
- every registry address and listening socket is the host's own (Mooncake's wildcard listeners
  confined to the host's NIC);
- TTFT across hosts next to the same deployment on loopback (reported, not asserted; opt-in
  with ``EPD_TEST_LOOPBACK_TTFT=1`` since it starts a second deployment);
- a decode host's link cut mid-stream: the request migrates to the other decode host,
  token-exact, within about 2x the instance TTL;
- an instance whose advertised address its peers cannot reach: it logs which peer could not
  reach it and the gateway does not route to it.

Needs root and iproute2; skips otherwise. ``pytest tests/multihost -s`` prints the measured
numbers (lines starting ``[multihost]``). About 60-70 s on 2 cores (+30 s with the TTFT baseline).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
import urllib.request

import pytest

from epd.registry.registry import Registry
from tests.e2e.chaos import ClientRequest, leaks, wait_for
from tests.e2e.http import post, user_message
from tests.model_fixtures import sample_photos
from tests.multihost.cluster import start_ns_cluster
from tests.multihost.netns import Topology, why_unavailable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TTL_S = 2.0
FAST = {"EPD_HEARTBEAT_S": "0.5", "EPD_INSTANCE_TTL_S": str(TTL_S), "EPD_REGISTRY_REFRESH_S": "0.2",
        "EPD_SEND_TIMEOUT_S": "1"}
HOSTS = {"gw": 10, "enc": 21, "pre": 22, "dec0": 23, "dec1": 24, "far": 31, "solo": 40}
PLACEMENT = {"redis": "gw", "gateway-0": "gw", "encoder-0": "enc", "prefill-0": "pre", "decode-0": "dec0",
             "decode-1": "dec1"}
UNREACHABLE = "198.18.0.99"  # an address only its own host has (on lo): no peer has a route to it
MAX_NEW = 24
CASES = {
    "one_image": (["astronaut"], "Describe the picture."),
    "two_images": (["chelsea", "coffee"], "What do these two pictures have in common?"),
    "text": ([], "Tell me something about the garden in spring."),
}
LONG = 160  # the text case runs this long without an EOS (tests/e2e/test_faults.py)
BLOCK_SIZE = 16  # EPD_KV_BLOCK_SIZE default: KV moves in whole blocks
SLACK_BYTES = 128 * 1024  # control messages, heartbeats and registry reads during one request


@pytest.fixture(scope="module")
def topo():
    why = why_unavailable()
    if why:
        pytest.skip(f"cross-host test needs network namespaces: {why}")
    pytest.importorskip("mooncake.engine", reason="needs mooncake-transfer-engine (and libibverbs1)")
    t = Topology(HOSTS)
    try:
        t.create()
        t.add_address("far", f"{UNREACHABLE}/32")
        yield t
    finally:
        t.destroy()


@pytest.fixture(scope="module")
def cluster(topo, tmp_path_factory, tiny_model):
    c = start_ns_cluster(topo, tmp_path_factory.mktemp("multihost"), tiny_model, PLACEMENT, extra_env=FAST)
    c.registry = Registry(c.client_redis_url, secret=c.env["EPD_CLUSTER_SECRET"].encode())
    yield c
    codes = c.stop()
    _report("stop", {"exit_codes": codes, "seconds": c.stop_s})
    assert all(p.poll() is not None for p in c.procs.values()), codes


@pytest.fixture(scope="module")
def photos():
    return sample_photos()


@pytest.fixture(scope="module")
def hf(hf_reference):
    """Greedy ids of HF ``generate()``, and the prompt ids and image token counts of each input."""

    def run(images: list, text: str, n: int) -> tuple[list[int], list[int], list[int]]:
        prompt, tokens = hf_reference.greedy(images, text, n)
        grids = hf_reference.inputs(images, text)["image_grid_thw"].tolist() if images else []
        merge = hf_reference.config.vision_config.spatial_merge_size ** 2
        return prompt, tokens, [t * h * w // merge for t, h, w in grids]

    run.config = hf_reference.config
    return run


def _chat(images: list, text: str, n: int, stream: bool = False) -> dict:
    return {"messages": user_message(images, text), "max_tokens": n, "temperature": 0, "return_token_ids": True,
            "stream": stream}


def _delta(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    return {h: (after[h][0] - before[h][0], after[h][1] - before[h][1]) for h in after}


def _payload(hf_config, prompt_len: int, image_tokens: list[int]) -> tuple[int, int]:
    """Bytes the request must move one-sided: (features, KV), float32, from the model config."""
    text = hf_config.text_config
    features = sum(image_tokens) * text.hidden_size * 4
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4
    return features, math.ceil(prompt_len / BLOCK_SIZE) * BLOCK_SIZE * per_token


def _decode_of(cluster, rid: str) -> str:
    """The decode instance the gateway chose for request ``rid`` (from its routing log line)."""
    line = next(ln for ln in cluster.log("gateway-0").splitlines() if f"request {rid}: route" in ln)
    return line.rsplit("decode ", 1)[1].strip()


def _report(name: str, data: dict) -> None:
    print(f"\n[multihost] {name}: {json.dumps(data)}")


def test_served_token_exact_across_hosts_and_bytes_cross_the_links(cluster, topo, hf, photos):
    """Each case's greedy ids equal HF ``generate()``; the NIC counters of the encoder, prefill
    and decode hosts carry the feature and KV payloads (and the gateway's does not carry KV)."""
    t0, idle0 = time.monotonic(), topo.all_counters()
    time.sleep(1.0)  # an idle second: the background traffic (heartbeats, registry reads, probes)
    report = {"idle_rx_tx_bytes_per_s": {h: tuple(round(b / (time.monotonic() - t0)) for b in v)
                                         for h, v in _delta(idle0, topo.all_counters()).items()}}
    for case, (names, text) in CASES.items():
        images = [photos[n] for n in names]
        prompt, expected, image_tokens = hf(images, text, MAX_NEW)
        features, kv = _payload(hf.config, len(prompt), image_tokens)
        request = json.dumps(_chat(images, text, MAX_NEW)).encode()
        before, t0 = topo.all_counters(), time.monotonic()
        status, headers, body = post(f"{cluster.url}/v1/chat/completions", request)
        moved, took = _delta(before, topo.all_counters()), time.monotonic() - t0
        assert status == 200, body
        assert body["prompt_token_ids"] == prompt
        assert body["choices"][0]["token_ids"] == expected, case
        assert headers["x-epd-route"] == ("encode" if names else "text")
        dec = cluster.hosts[_decode_of(cluster, headers["x-request-id"])]
        # decode host: KV in; prefill host: KV out (features in); encoder host: features out
        assert kv <= moved[dec][0] <= kv * 1.1 + SLACK_BYTES, (case, kv, moved)
        assert kv <= moved["pre"][1] <= kv * 1.1 + SLACK_BYTES, (case, kv, moved)
        assert features <= moved["enc"][1] <= features * 1.1 + SLACK_BYTES, (case, features, moved)
        assert features <= moved["pre"][0] <= features * 1.1 + SLACK_BYTES, (case, features, moved)
        # beyond the client's request the gateway host took in little: no feature or KV byte went through it
        assert moved["gw"][0] - len(request) < SLACK_BYTES, (case, len(request), moved)
        log = cluster.log("prefill-0")
        assert f"KV {kv} bytes written" in log  # the service moved what the config predicts
        report[case] = {"prompt_tokens": len(prompt), "image_tokens": image_tokens, "expected_feature_bytes": features,
                        "expected_kv_bytes": kv, "client_request_bytes": len(request), "request_s": round(took, 3),
                        "decode_host": dec, "rx_tx_bytes": {h: moved[h] for h in ("gw", "enc", "pre", dec)}}
    _report("bytes", report)


def test_every_address_is_the_hosts_own(cluster, topo):
    """Registry entries advertise the host's address; every listening socket is bound to it, or
    (the transfer engine's wildcard listeners) confined to the host's NIC with SO_BINDTODEVICE."""
    for info in cluster.registry.instances():
        addr = topo.hosts[cluster.hosts[info.instance_id]].address
        assert info.inbox.startswith(f"tcp://{addr}:"), info
        if "gateway" not in info.roles:
            assert info.transfer_handle.startswith(f"mooncake://{addr}:") and info.admin.startswith(f"{addr}:"), info
    for host in ("gw", "enc", "pre", "dec0", "dec1"):
        addr = topo.hosts[host].address
        local = [row.split()[3].rsplit(":", 1)[0] for row in topo.listeners(host).splitlines()]
        assert local and set(local) <= {addr, "0.0.0.0%eth0", "*%eth0"}, (host, local)
        if host != "gw":
            assert {"0.0.0.0%eth0", "*%eth0"} <= set(local), (host, local)  # Mooncake's two ports


def _ttft(url: str, image) -> tuple[float, list[int]]:
    """Client-side TTFT (request sent → first streamed token) of one streaming request, and its ids."""
    body = _chat([image], "Describe the picture.", 4, stream=True)
    out = ClientRequest(f"{url}/v1/chat/completions", body).result(60)
    assert out.status == 200 and out.error is None, out.error
    return out.chunk_times[0] - out.t_start, out.token_ids


@pytest.mark.skipif(not os.environ.get("EPD_TEST_LOOPBACK_TTFT"),
                    reason="starts a second (loopback) deployment, ~30 s more: set EPD_TEST_LOOPBACK_TTFT=1")
def test_ttft_across_hosts_next_to_loopback(cluster, topo, tiny_model, tmp_path, photos):
    """The same requests (fresh photos: the encode route) alternately on the spread deployment
    and on the same deployment with every stage on host ``solo`` over 127.0.0.1 (the client
    crosses one veth to the gateway in both); TTFTs are reported, not asserted, and both give
    the same tokens."""
    base = photos["coffee"]
    images = [base.crop((i * 9, i * 7, i * 9 + 448, i * 7 + 336)) for i in range(23)]
    local = start_ns_cluster(topo, tmp_path, tiny_model, {n: "solo" for n in ("redis", "gateway-0", "encoder-0",
                             "prefill-0", "decode-0")}, extra_env=FAST, loopback=True)
    try:
        cross, loop = [], []
        for i, image in enumerate(images):
            urls = [cluster.url, local.url] if i % 2 else [local.url, cluster.url]  # no order bias
            (t_a, ids_a), (t_b, ids_b) = (_ttft(u, image) for u in urls)
            assert ids_a == ids_b
            if i >= 3:  # the first requests of a process are slower (lazy initialisation)
                cross.append(t_a if urls[0] == cluster.url else t_b)
                loop.append(t_b if urls[0] == cluster.url else t_a)
        reads = {name: [float(ms) for ms in re.findall(r"read \d+ feature bytes of image 0 from \S+ in ([\d.]+) ms",
                                                       c.log("prefill-0"))[-len(cross):]]
                 for name, c in (("cross_host", cluster), ("loopback", local))}
    finally:
        local.stop()
    ms = lambda xs: [round(x * 1e3, 1) for x in xs]  # noqa: E731
    _report("ttft_ms", {"cross_host": ms(cross), "loopback": ms(loop),
                        "median_feature_read_ms": {k: statistics.median(v) for k, v in reads.items()},
                        "median_cross": round(statistics.median(cross) * 1e3, 1),
                        "median_loopback": round(statistics.median(loop) * 1e3, 1),
                        "median_paired_overhead": round(statistics.median(
                            [c - lo for c, lo in zip(cross, loop, strict=True)]) * 1e3, 1)})


def test_decode_host_cut_mid_stream_migrates_within_2x_ttl(cluster, topo, hf):
    """``ip link set eth0 down`` on the decode host of a running stream: the gateway declares
    that decode gone once its registry entry expires and migrates the request to the other
    decode host; the client sees one token-exact stream, the stall bounded by ~2x TTL."""
    text = CASES["text"][1]
    _, expected, _ = hf([], text, LONG)
    wait_for(lambda: not leaks(cluster.registry), 15, what="every stage idle")
    req = ClientRequest(f"{cluster.url}/v1/chat/completions", _chat([], text, LONG, stream=True), after_tokens=6)
    assert req.first_tokens.wait(60)
    rid = req.out.rid
    victim = _decode_of(cluster, rid)
    host = cluster.hosts[victim]
    t_cut = time.monotonic()
    topo.link_down(host)
    try:
        out = req.result(60)
    finally:
        topo.link_up(host)
    assert out.status == 200 and out.error is None, out.error
    assert out.done and out.finish_reason == "length"
    assert out.token_ids == expected  # one seamless stream, token-exact
    assert any(rid in ln and "migration as" in ln for ln in cluster.log("gateway-0").splitlines())
    gaps = [(b - a, b) for a, b in zip(out.chunk_times, out.chunk_times[1:], strict=False)]
    stall, t_resumed = max(gaps)
    _report("link_down", {"victim": victim, "host": host, "ttl_s": TTL_S, "stall_s": round(stall, 3),
                          "cut_to_resumed_s": round(t_resumed - t_cut, 3), "cut_to_end_s": round(out.t_end - t_cut, 3),
                          "tokens_before_cut": sum(t < t_cut for t in out.chunk_times)})
    assert t_resumed - t_cut < 2 * TTL_S + 2.0  # 2x TTL, plus the re-prefill on 2 loaded cores
    # the cut host comes back under its old incarnation; nothing stays held anywhere
    wait_for(lambda: not leaks(cluster.registry), 20, what="every stage to free what it held")


def test_unreachable_advertised_address_is_reported_and_not_routed_to(cluster, photos):
    """An encoder that advertises an address no peer can reach (here: one that only exists on
    its host's loopback) logs which peers could not reach it, and the gateway leaves it out."""
    name = "encoder-1"
    cluster.spawn(name, "far", {"EPD_HOST": UNREACHABLE, "EPD_ADVERTISE_HOST": UNREACHABLE})
    wait_for(lambda: f"{name} ready" in cluster.log(name), 60, what=f"{name} to start")
    # its transfer engine is confined to the interface that has the address (a second one on lo)
    assert "accept only connections on interface lo" in cluster.log(name)
    for peer in ("gateway-0", "prefill-0"):  # the peers that would send it work and read its pool
        wait_for(lambda p=peer: f"peer {p} could not reach it at tcp://{UNREACHABLE}:" in cluster.log(name),
                 5 * TTL_S, what=f"{name} to log that {peer} could not reach it")
    # the gateway's view drops it once the peer watch's grace for a missing entry has passed
    wait_for(lambda: _encoders_in_view(cluster.url) == 1, 3 * TTL_S, what=f"the gateway to leave {name} out")
    base = photos["chelsea"]
    for i in range(3):  # two images each: with two usable encoders they would be split between them
        images = [base.crop((i * 11, 0, i * 11 + 300, 280)), base.crop((i * 11 + 5, 3, i * 11 + 305, 283))]
        status, _, body = post(f"{cluster.url}/v1/chat/completions", _chat(images, "Describe the pictures.", 4))
        assert status == 200, body
    assert f"stage {name} unreachable" not in cluster.log("gateway-0")  # never tried, so no send timed out
    assert _encoders_in_view(cluster.url) == 1  # still out: the reports are renewed while it stays unreachable
    assert "encoded" not in cluster.log(name)


def _encoders_in_view(url: str) -> int:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
        return json.loads(resp.read())["instances"]["encoder"]
