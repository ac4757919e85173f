"""``epd profile --merge``: several profiles of one model and device as one, each measurement the
median over them; mismatched or scaled profiles are refused with the reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from epd.cli import main
from epd.plan.calibrate import apply_probe, merge
from epd.plan.profile import CostModel, Profile, ProfileError

SRC = Path(__file__).resolve().parents[2] / "docs/plan/profile-tiny-avx512-v4.json"


def _drawn(raw: dict, speed: float, path: str) -> Profile:
    """The stored profile as if measured with the host ``speed`` × slower: every engine sample,
    probe latency and capacity point scaled."""
    raw = copy.deepcopy(raw)
    for per in raw["stages"].values():
        for model in per.values():
            for s in model["samples"]:
                s["s"] *= speed
    for run in raw["device"]["front_end"]["runs"].values():
        for key in [k for k, v in run.items() if k.endswith("_median_s") and isinstance(v, float)]:
            run[key] *= speed
    raw["device"]["slowdown"]["prefill"]["encode"] = min(1.0, 0.9 * speed)
    raw["host"]["gateway"]["token_s"] *= speed
    prof = Profile.from_json(raw, path)
    prof.path = path
    return prof


def test_merge_takes_the_median_of_each_measurement():
    raw = json.loads(SRC.read_text())
    profiles = [_drawn(raw, f, f"p{f}") for f in (1.3, 1.0, 0.9)]
    got = merge(profiles)
    middle = profiles[1]
    for stage, per in middle.stages.items():
        for t, model in per.items():
            assert [s["s"] for s in got.stages[stage][t].samples] == pytest.approx([s["s"] for s in model.samples])
            assert got.stages[stage][t].coef == pytest.approx(CostModel.fitted(stage, model.samples).coef,
                                                              rel=1e-6, abs=1e-12)
    runs = got.device["front_end"]["runs"]
    assert runs["image_one"]["ttft_median_s"] == pytest.approx(raw["device"]["front_end"]["runs"]["image_one"]
                                                               ["ttft_median_s"])
    assert got.device["slowdown"]["prefill"]["encode"] == pytest.approx(0.9)
    assert got.host["gateway"]["token_s"] == pytest.approx(raw["host"]["gateway"]["token_s"])
    assert [m["path"] for m in got.device["merged_from"]] == ["p1.3", "p1.0", "p0.9"]
    # the services' overheads are derived against the merged fit: the middle draw's, as a refit gives
    assert got.host["service"] == pytest.approx(apply_probe(middle.refitted()).host["service"], rel=1e-3, abs=1e-6)


def test_merge_refuses_mismatched_scaled_or_single_profiles():
    raw = json.loads(SRC.read_text())
    a = _drawn(raw, 1.0, "a.json")
    other = copy.deepcopy(raw)
    other["dtype"] = "float32"
    b = Profile.from_json(other, "b.json")
    b.path = "b.json"
    with pytest.raises(ProfileError, match="b.json .*float32.* with a.json .*bfloat16"):
        merge([a, b])
    with pytest.raises(ProfileError, match="at least two"):
        merge([a])
    scaled = a.scaled({"encode": 0.5}, "test")
    with pytest.raises(ProfileError, match="scaled"):
        merge([a, scaled])


def test_cli_merge_writes_a_profile_or_exits_2(tmp_path, capsys):
    raw = json.loads(SRC.read_text())
    paths = []
    for f in (1.2, 1.0):
        path = tmp_path / f"p{f}.json"
        _drawn(raw, f, str(path)).save(path)
        paths.append(str(path))
    with pytest.raises(SystemExit) as done:
        main(["profile", "--merge", *paths, "--out", str(tmp_path / "m.json")])
    assert done.value.code == 0 and "the median of 2 profiles" in capsys.readouterr().out
    assert len(Profile.load(tmp_path / "m.json").device["merged_from"]) == 2
    with pytest.raises(SystemExit) as done:
        main(["profile", "--merge", paths[0], "--out", str(tmp_path / "m1.json")])
    assert done.value.code == 2 and "at least two" in capsys.readouterr().err


def test_decode_level_sits_between_the_samples_and_the_served_steps():
    """A float32 mid profile whose deployment probe timed the served decode step at 0.73 × (batch 1)
    and 1.04 × (batch 4) its engine fit: the decode costs move by the square root of their
    geometric mean, from the samples every time (applying it twice changes nothing); served steps
    equal to the fit move nothing."""
    raw = json.loads((SRC.parent / "profile-mid-avx2.json").read_text())
    prof = Profile.from_json(raw, "mid")
    once = apply_probe(prof.refitted())
    level = once.device["decode_level"]
    assert 0.7 < level["served_over_fit"] < 1.0
    assert level["applied"] == pytest.approx(level["served_over_fit"] ** 0.5)
    for t, model in prof.stages["decode"].items():
        fresh = CostModel.fitted("decode", model.samples).coef
        assert once.stages["decode"][t].coef == pytest.approx({k: v * level["applied"] for k, v in fresh.items()})
        assert apply_probe(once).stages["decode"][t].coef == pytest.approx(once.stages["decode"][t].coef)
    even = copy.deepcopy(raw)
    for name in ("text_serial", "text_many"):
        even["device"]["front_end"]["runs"][name]["decode_step_ms"] /= level["served_over_fit"]
    assert apply_probe(Profile.from_json(even, "even")).device["decode_level"]["applied"] == pytest.approx(1.0)


def test_the_served_gap_is_a_floor_under_a_disturbed_bare_pair():
    """A tiny profile whose bare encode+decode pair round read the decode at ×0.63 beside the
    encoder while the deployment's whole gap (pair interference and front-end time-slicing
    together) was ×0.89: the factor becomes the gap, the source says so, applying it again changes
    nothing, and a bare factor above the gap is kept as measured."""
    raw = json.loads((SRC.parent / "profile-tiny-avx512-v7.json").read_text())
    bare = raw["device"]["slowdown"]["decode"]["encode"]
    once = apply_probe(Profile.from_json(raw, "v7"))
    gap = once.device["served_slowdown"]["decode by encode"]
    assert bare < 0.7 < 0.85 < gap < 1.0
    assert once.device["slowdown"]["decode"]["encode"] == pytest.approx(gap)
    assert "gap" in once.device["slowdown_source"]["decode by encode"]
    again = apply_probe(once).device
    assert (again["slowdown"], again["slowdown_source"]) == (once.device["slowdown"], once.device["slowdown_source"])
    calm = copy.deepcopy(raw)
    calm["device"]["slowdown"]["decode"]["encode"] = 0.95
    kept = apply_probe(Profile.from_json(calm, "calm")).device
    assert kept["slowdown"]["decode"]["encode"] == pytest.approx(0.95)
    assert "decode by encode" not in kept["slowdown_source"]
