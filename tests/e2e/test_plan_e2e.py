"""``epd profile`` on the tiny model (quick mode) writes a valid profile that ``epd plan`` can
simulate and search with. Checks the schema and the plumbing, not the times."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from epd.plan.profile import STAGES, Profile

pytestmark = pytest.mark.slow


def test_profile_then_plan_on_the_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "tiny.json"
    proc = subprocess.run(
        [sys.executable, "-m", "epd.cli", "profile", "--model", str(tiny_model), "--out", str(out), "--threads", "1",
         "--quick", "--reps", "1", "--transfer-backend", "shm", "--disable-tqdm", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    prof = Profile.load(out)
    raw = json.loads(out.read_text())
    assert raw["dtype"] == "float32" and raw["threads"] == [1] and raw["device"]["kind"] == "cpu"
    for stage in STAGES:
        model = prof.stages[stage][1]
        assert model.samples and all(s["s"] > 0 for s in model.samples)
        assert all(v >= 0 for v in model.coef.values())
    assert prof.transfer.samples and prof.host["hop_s"] > 0 and prof.host["token_s"] > 0
    assert prof.model["num_layers"] > 0 and prof.model["template_tokens"] > 0
    # the front end was measured on a running deployment: the gateway and the client cost CPU per token
    for who in ("gateway", "client"):
        costs = prof.front(who)
        assert costs["request_s"] + costs["request_mbyte_s"] > 0 and costs["delivery_s"] + costs["token_s"] > 0, who
    # the encoder's forwards were read back from the deployment's log (its format and the probe's parser agree)
    runs = raw["device"]["front_end"]["runs"]
    assert 10 < runs["image_one"]["encode_forward_ms"] < 10_000
    assert 0.1 < runs["text_serial"]["decode_step_ms"] < 1_000 and 0.1 < runs["text_many"]["decode_step_ms"] < 1_000
    # one-thread profile: a single core's worth, so no pairwise slowdown is measured unless the host has 2+ cores
    slow = raw["device"].get("slowdown")
    if slow is not None:
        assert set(slow) == {"encode", "prefill", "decode"}
        assert all(0 < v <= 1 for row in slow.values() for v in row.values())
        if runs["beside"].get("encode_forward_ms"):  # the deployment's figure replaced the bare pair's
            assert slow["encode"]["decode"] == pytest.approx(
                min(1.0, runs["image_one"]["encode_forward_ms"] / runs["beside"]["encode_forward_ms"]))

    sim = subprocess.run(
        [sys.executable, "-m", "epd.cli", "plan", "--profile", str(out), "--topology", "E-P-D",
         "--dataset-name", "sharegpt4o-like", "--num-prompts", "10", "--request-rate", "2",
         "--goodput", "ttft:2000", "tpot:50", "--save-result", "--result-dir", str(tmp_path),
         "--result-filename", "sim.json"],
        capture_output=True, text=True, timeout=120)
    assert sim.returncode == 0, sim.stderr
    res = json.loads((tmp_path / "sim.json").read_text())
    assert res["completed"] == 10 and res["backend"] == "epd-sim" and res["median_ttft_ms"] > 0
