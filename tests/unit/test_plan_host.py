"""The simulator's host model: pairwise stage slowdowns, the measured front end (gateway and
client as two serial loops) and the decode loop's overhead — how ``epd profile`` derives them
from its measurements and how the simulator applies them."""

from __future__ import annotations

import copy
import time

import pytest
import simpy

from epd.bench.metrics import compute_metrics
from epd.plan import frontend
from epd.plan.deployment import Deployment
from epd.plan.profile import Profile, ProfileError, decode_x
from epd.plan.shared import SharedDevice
from epd.plan.sim import simulate
from tests.unit.test_plan import _raw, _workload


def test_a_pairwise_slowdown_slows_the_victim_only_while_the_other_stage_runs():
    env = simpy.Environment()
    host = SharedDevice(env, 2.0, slowdown={"decode": {"encode": 0.5}})
    ends = {}

    def job(name, stage, work, group):
        yield host.run(work, 1.0, owner=name, group=group, stage=stage)
        ends[name] = env.now

    env.process(job("decode", "decode", 1.0, "d"))
    env.process(job("encode", "encode", 1.0, "e"))
    env.run()
    # half speed for the first second (0.5 done), full speed after the encode ended
    assert ends == {"encode": pytest.approx(1.0), "decode": pytest.approx(1.5)}

    env2 = simpy.Environment()
    same = SharedDevice(env2, 2.0, slowdown={"decode": {"encode": 0.5}})
    out = {}

    def job2(name, stage):
        yield same.run(1.0, 1.0, owner=name, group="one-process", group_cap=2.0, stage=stage)
        out[name] = env2.now

    env2.process(job2("decode", "decode"))
    env2.process(job2("encode", "encode"))
    env2.run()
    assert out["decode"] == pytest.approx(1.0)  # roles of one process: its threads, not a co-runner


def _run(requests, tokens, gateway_s, client_s, wall_s=1.0, mbytes=0.0, itl=0.0, c=1):
    return {"requests": requests, "tokens": tokens, "gateway_s": gateway_s, "client_s": client_s,
            "wall_s": wall_s, "mbytes": mbytes, "itl_median_s": itl, "concurrency": c}


def test_front_end_costs_are_solved_from_the_four_workloads():
    req, mb, step, tok = 2e-3, 20e-3, 200e-6, 100e-6
    k = frontend.TEXT_MANY[2]

    def cpu(n, tokens, mbytes=0.0, batch=1):
        # n requests of one first token each, then (tokens - n) more in deliveries of ``batch``
        first = n * (req + step + tok + mb * mbytes / max(n, 1))
        rest = tokens - n
        return first + rest * tok + rest / batch * step

    runs = {"text_one": _run(40, 40, cpu(40, 40), cpu(40, 40) / 2),
            "text_serial": _run(4, 512, cpu(4, 512), cpu(4, 512) / 2),
            "text_many": _run(8, 1024, cpu(8, 1024, batch=k), cpu(8, 1024, batch=k) / 2),
            "image_one": _run(16, 16, cpu(16, 16, 0.8), cpu(16, 16, 0.8) / 2, mbytes=0.8)}
    idle = 0.01  # CPU s per s the gateway spends idle: taken off its totals
    for run in runs.values():
        run["gateway_s"] += idle * run["wall_s"]
    got = frontend.solve(runs, idle)
    assert got["gateway"] == pytest.approx({"request_s": req, "request_mbyte_s": mb, "delivery_s": step,
                                            "token_s": tok}, rel=1e-6)
    assert got["client"] == pytest.approx({"request_s": req / 2, "request_mbyte_s": mb / 2, "delivery_s": step / 2,
                                           "token_s": tok / 2}, rel=1e-6)
    # nothing measured is never a negative cost
    zero = frontend.solve({n: _run(r["requests"], r["tokens"], 0.0, 0.0, mbytes=r["mbytes"])
                           for n, r in runs.items()}, idle)
    assert all(v == 0.0 for who in zero.values() for v in who.values())


def test_service_overheads_are_what_the_services_exceed_the_profile_and_simulator_by():
    """Decode: the probe's inter-token latency less the profiled step; prefill and encode: the
    probe's TTFT less the simulator's for the same requests — so the simulator, given the
    overheads, reproduces the probe's TTFTs."""
    prof = Profile.from_json(_raw(), "p")
    step, tok, k = 4e-4, 1e-4, frontend.TEXT_MANY[2]
    runs = {}
    for name, batch, n in (("text_serial", 1, 4), ("text_many", k, 8)):
        ctx = int(prof.model["template_tokens"] + frontend.PROMPT_TOKENS + 128 / 2)
        runs[name] = _run(n, n * 128, 0, 0, itl=prof.cost("decode", 1, decode_x(batch, ctx)) + step + tok * batch)
    runs["text_one"] = _run(40, 40, 0, 0)
    runs["image_one"] = _run(16, 16, 0, 0, mbytes=16 * 0.05)
    runs["text_one"]["ttft_median_s"] = runs["image_one"]["ttft_median_s"] = 0.0
    none = frontend.service_overheads(prof, runs, 1)  # TTFTs below the model's: no negative overhead
    assert none["prefill_request_s"] == 0.0 and none["encode_image_s"] == 0.0
    assert none["decode_step_s"] == pytest.approx(step, rel=1e-6) and none["decode_token_s"] == pytest.approx(tok)
    base_text = _sim_ttft(prof, frontend.TEXT_ONE, runs["text_one"], False, none)
    base_image = _sim_ttft(prof, frontend.IMAGE_ONE, runs["image_one"], True, none)
    runs["text_one"]["ttft_median_s"] = base_text + 0.004
    runs["image_one"]["ttft_median_s"] = base_image + 0.004 + 0.010
    got = frontend.service_overheads(prof, runs, 1)
    # requests queue two at a time in the probe, so an overhead adds to the median TTFT more than once
    assert 0 < got["prefill_request_s"] < 0.004 and 0 < got["encode_image_s"] < 0.010
    assert _sim_ttft(prof, frontend.TEXT_ONE, runs["text_one"], False, got) == pytest.approx(
        runs["text_one"]["ttft_median_s"], abs=1e-4)
    assert _sim_ttft(prof, frontend.IMAGE_ONE, runs["image_one"], True, got) == pytest.approx(
        runs["image_one"]["ttft_median_s"], abs=1e-4)
    # the encoder logged forwards slower than the fitted one: that excess is the host's state, not overhead
    from epd.plan.profile import encode_x

    _, patches = prof.image_tokens(*frontend.IMAGE_SIZE)
    fitted = prof.cost("encode", 1, encode_x([(patches, frontend.IMAGE_SIZE[0] * frontend.IMAGE_SIZE[1])]))
    excess = got["encode_image_s"] / 2
    runs["image_one"]["encode_forward_ms"] = (fitted + excess) * 1e3
    less = frontend.service_overheads(prof, runs, 1)
    assert less["encode_image_s"] == pytest.approx(got["encode_image_s"] - excess, rel=1e-3)
    assert less["prefill_request_s"] == got["prefill_request_s"]
    runs["image_one"]["encode_forward_ms"] = (fitted + 1.0) * 1e3  # never below zero
    assert frontend.service_overheads(prof, runs, 1)["encode_image_s"] == 0.0


def _sim_ttft(prof, kind, run, images, service):
    from dataclasses import replace

    trial = replace(prof, host={**prof.host, "service": dict(service)})
    res = simulate(trial, Deployment("E-P-D"), frontend._probe_workload(prof, kind, run, images))
    ttft = sorted(r.ttft for r in res.records)
    return ttft[len(ttft) // 2]


def _measured(prof_raw):
    raw = copy.deepcopy(prof_raw)
    raw["host"]["gateway"] = {"request_s": 2e-3, "request_mbyte_s": 0.02, "delivery_s": 3e-4, "token_s": 1e-4}
    raw["host"]["client"] = {"request_s": 1e-3, "request_mbyte_s": 0.005, "delivery_s": 1e-4, "token_s": 5e-5}
    raw["host"]["service"] = {"decode_step_s": 1e-3, "decode_token_s": 2e-4, "prefill_request_s": 0.0,
                              "encode_image_s": 0.0}
    return raw


def test_profile_front_end_fields_round_trip_validate_and_default(tmp_path):
    legacy = Profile.from_json(_raw(), "p")
    assert legacy.front("client") == dict.fromkeys(("request_s", "request_mbyte_s", "delivery_s", "token_s"), 0.0)
    assert legacy.front("gateway")["token_s"] == legacy.host["token_s"] and legacy.overhead_s("decode", 4) == 0.0
    prof = Profile.from_json(_measured(_raw()), "p")
    again = Profile.load(prof.save(tmp_path / "p.json"))
    assert again.front("gateway") == prof.front("gateway") and again.front("client")["token_s"] == 5e-5
    assert again.overhead_s("decode", 4) == pytest.approx(1e-3 + 4 * 2e-4) and again.overhead_s("encode", 3) == 0
    scaled = prof.scaled({"host": 0.5}, "test")
    assert scaled.front("client")["request_s"] == pytest.approx(5e-4)
    for who, key in (("gateway", "token_s"), ("client", "request_s"), ("service", "decode_step_s")):
        bad = _measured(_raw())
        bad["host"][who][key] = -1.0
        with pytest.raises(ProfileError, match=rf"host\.{who}\.{key}"):
            Profile.from_json(bad, "p.json")


def test_measured_front_end_and_decode_overhead_lengthen_ttft_and_tpot():
    base = Profile.from_json(_raw(), "p")
    measured = Profile.from_json(_measured(_raw()), "p")
    wl = _workload(base, n=6, images=1, max_tokens=32, rate=0.5)
    out = {}
    for name, prof in (("base", base), ("measured", measured)):
        res = simulate(prof, Deployment("E-P-D"), wl)
        out[name] = (compute_metrics(res.records, res.duration_s, {}), res.stats)
    b, m = out["base"][0], out["measured"][0]
    # a lone request: the decode step grows by decode_step_s + decode_token_s (1.2 ms) plus the front end's
    assert m["median_tpot_ms"] - b["median_tpot_ms"] == pytest.approx(1.2, abs=0.3)
    # the client's and the gateway's request work (≈ 3 ms + 25 ms/MB × 0.05 MB) come before any stage
    assert m["median_ttft_ms"] > b["median_ttft_ms"] + 2.5
    assert out["measured"][1]["client_busy"] > 0 and out["base"][1]["client_busy"] == 0


def test_decode_beside_encode_is_the_streams_inter_token_latency_ratio():
    runs = {"text_serial": _run(4, 512, 0, 0, itl=0.004), "beside": {"itl_median_s": 0.005, "ttft_median_s": 0.3}}
    assert frontend.decode_beside_encode(runs) == pytest.approx(0.8)
    runs["beside"]["itl_median_s"] = 0.0035  # faster beside the images than alone: noise, not a speed-up
    assert frontend.decode_beside_encode(runs) == 1.0


def test_repetitions_merge_into_totals_and_median_latencies():
    reps = [_run(3, 384, 0.1, 0.05, itl=0.004), _run(3, 384, 0.2, 0.05, itl=0.003), _run(3, 384, 0.1, 0.05, itl=0.009)]
    got = frontend._merge(reps)
    assert got["requests"] == 9 and got["tokens"] == 3 * 384 and got["gateway_s"] == pytest.approx(0.4)
    assert got["itl_median_s"] == 0.004 and got["reps_itl_median_s"] == [0.004, 0.003, 0.009]
    assert got["concurrency"] == 1
    assert frontend._merge(reps[:2])["itl_median_s"] == pytest.approx(0.0035)  # two: their mean


def test_colocation_probe_reports_a_unit_that_raises():
    from epd.plan.parallel import _colocated_rates, colocation_efficiency

    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 3:  # fine alone, fails in the threaded phase
            raise ValueError("boom")

    got = _colocated_rates(flaky, lambda: None, 0.05)
    assert "error" in got and "encode: ValueError: boom" in got["error"]
    fine = _colocated_rates(lambda: time.sleep(0.001), lambda: time.sleep(0.001), 0.05)
    assert set(fine) == {"solo", "together"}
    assert colocation_efficiency(fine)["process_colocation_efficiency"] > 0


def test_refit_derives_the_service_overheads_again_from_the_stored_probe_runs(tmp_path, capsys):
    """The overheads are residuals against the fitted costs, so ``epd profile --refit`` derives
    them again from the deployment probe's runs the profile stores (here: a real profile whose
    overheads were blanked recovers them, the fit being the same)."""
    import json
    from pathlib import Path

    from epd.cli import main

    src = Path(__file__).resolve().parents[2] / "docs/plan/profile-tiny-avx512-v4.json"
    raw = json.loads(src.read_text())
    want = raw["host"]["service"]
    assert want["decode_step_s"] > 0 and want["encode_image_s"] > 0
    raw["host"]["service"] = dict.fromkeys(want, 0.0)
    (tmp_path / "blank.json").write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as done:
        main(["profile", "--refit", str(tmp_path / "blank.json"), "--out", str(tmp_path / "refit.json")])
    assert done.value.code == 0 and "services beyond their forwards" in capsys.readouterr().out
    got = Profile.load(tmp_path / "refit.json").host["service"]
    assert got == pytest.approx(want, rel=1e-3, abs=1e-6)
