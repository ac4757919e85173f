"""``epd plan`` / ``epd profile``: profile schema and fitting, the simulator (deterministic,
conserving, monotonic in load, co-location slows both roles, the services' policies), the
search (exhaustive and Optuna agree on a small space), bad CLI input exits 2 with one line.

Profiles here are written by hand (known coefficients), so no test depends on timing."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import simpy

from epd.bench.metrics import compute_metrics
from epd.bench.workloads import WorkloadArgs
from epd.plan.deployment import Deployment, DeploymentError, Limits, notation
from epd.plan.profile import SCHEMA, Profile, ProfileError, decode_x, fit, prefill_x
from epd.plan.search import Config, SearchSpace, goodput, search
from epd.plan.shared import SharedDevice
from epd.plan.sim import Simulator, simulate
from epd.plan.workload import SimImage, SimRequest, SimWorkload, shapes, to_sim


def _raw(kind: str = "cpu", cores: int = 2, threads=(1, 2)) -> dict:
    """A hand-written profile: encode 100 ms/image + 50 µs/patch, prefill 5 ms + 0.1 ms/token,
    decode 5 ms + 0.5 ms/request, transfer 0.1 ms + 1 ms/MB (at 2 threads half of 1 thread's)."""
    def per(t, coef):
        return {str(t): {"coef": {k: v / t for k, v in coef.items()}}}

    stages = {
        "encode": {"base": 0.01, "images": 0.1, "patches": 5e-5, "patches_sq": 0.0, "src_mpixels": 0.01},
        "image_decode": {"base": 0.0005, "src_mpixels": 0.005},
        "prefill": {"base": 0.005, "requests": 0.001, "tokens": 1e-4, "tokens_sq": 0.0, "images": 0.0},
        "decode": {"base": 0.005, "batch": 5e-4, "batch_ctx": 1e-5},
    }
    return {
        "schema": SCHEMA, "seed": 0, "created": "",
        "device": {"kind": kind, "name": "test", "cores": cores, "memory_bytes": 8e9, "host_cores": 8},
        "model": {"name": "toy", "path": "", "num_layers": 4, "hidden_size": 256, "num_kv_heads": 2, "head_dim": 64,
                  "geometry": {"patch_size": 14, "merge_size": 2, "min_pixels": 3136, "max_pixels": 200704},
                  "template_tokens": 20, "image_wrap_tokens": 2, "weights_bytes": {"vision": 10**7, "language": 10**7}},
        "dtype": "bfloat16", "dtype_bytes": 2, "threads": list(threads), "transfer_backend": "shm",
        "stages": {s: {k: v for t in threads for k, v in per(t, c).items()} for s, c in stages.items()},
        "transfer": {"coef": {"base": 1e-4, "mbytes": 1e-3}},
        "host": {"request_s": 5e-4, "request_mbyte_s": 1e-3, "token_s": 5e-5, "hop_s": 1e-4,
                 "jpeg_bytes_per_pixel": 0.3},
    }


@pytest.fixture()
def prof() -> Profile:
    return Profile.from_json(_raw(), "test")


def _workload(prof, n=24, images=1, max_tokens=16, rate=4.0, size=(448, 448), reuse_every=0) -> SimWorkload:
    reqs = []
    for i in range(n):
        ims = []
        for k in range(images):
            tokens, patches = prof.image_tokens(*size)
            key = f"img-{i % reuse_every if reuse_every else i}-{k}"
            ims.append(SimImage(tokens, patches, size[0] * size[1], 50_000, key))
        prompt = 10 + 20 + sum(im.tokens + 2 for im in ims)
        reqs.append(SimRequest(i, 10, prompt, max_tokens, tuple(ims)))
    return SimWorkload(reqs, "test", rate, 1.0, 0)


# -- profile ------------------------------------------------------------------------------------

def test_profile_round_trips_and_costs_follow_the_coefficients(prof, tmp_path):
    path = prof.save(tmp_path / "p.json")
    again = Profile.load(path)
    assert again.to_json()["stages"] == prof.to_json()["stages"]
    assert prof.cost("prefill", 1, prefill_x([100])) == pytest.approx(0.005 + 0.001 + 0.01)
    assert prof.cost("prefill", 2, prefill_x([100])) == pytest.approx((0.005 + 0.001 + 0.01) / 2)
    assert prof.cost("decode", 1, decode_x(4, 1000)) == pytest.approx(0.005 + 4 * 5e-4 + 4 * 1e-5)
    assert prof.nearest_threads(3) == 2 and prof.nearest_threads(1) == 1
    assert prof.kv_bytes_per_token == 2 * 4 * 2 * 64 * 2
    assert prof.image_tokens(448, 448) == (256, 1024)


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.update(schema="other/1"), "schema"),
    (lambda r: r["model"].pop("num_layers"), "model.num_layers"),
    (lambda r: r["stages"]["decode"].pop("2"), "stages.decode.2"),
    (lambda r: r["stages"]["encode"]["1"]["coef"].update(patches=-1.0), "stages.encode.1.coef.patches"),
    (lambda r: r["host"].update(token_s="fast"), "host.token_s"),
    (lambda r: r.update(threads=[]), "threads"),
])
def test_invalid_profile_names_the_field(mutate, field):
    raw = copy.deepcopy(_raw())
    mutate(raw)
    with pytest.raises(ProfileError, match=field.replace(".", r"\.")):
        Profile.from_json(raw, "p.json")


def test_fit_recovers_nonnegative_coefficients():
    samples = [{"x": prefill_x(lens), "s": 0.004 + 2e-4 * sum(lens) + 0.0 * len(lens)}
               for lens in ([16], [64], [256], [1024], [64] * 4, [128] * 8)]
    coef, err = fit(("base", "requests", "tokens", "tokens_sq", "images"), samples)
    assert coef["base"] == pytest.approx(0.004, rel=1e-3)
    assert coef["tokens"] == pytest.approx(2e-4, rel=1e-3)
    assert all(v >= 0 for v in coef.values()) and err < 1e-6


# -- workload -------------------------------------------------------------------------------------

def test_sizes_only_workload_matches_the_real_generator(prof):
    pytest.importorskip("skimage")
    from epd.bench.workloads import build_workload

    args = WorkloadArgs(dataset_name="random-mm", num_prompts=8, seed=5, random_mm_base_items_per_request=2,
                        random_mm_num_mm_items_range_ratio=0.5, image_reuse=0.4,
                        random_mm_bucket_config="{(32, 48, 1): 0.5, (40, 40, 1): 0.5}")
    real, fast = build_workload(args), shapes(args)
    assert [(r.prompt, r.max_tokens, r.prompt_len, r.image_sizes) for r in real] == \
           [(r.prompt, r.max_tokens, r.prompt_len, r.image_sizes) for r in fast]

    def pattern(reqs):  # which images repeat which (keys differ, equality must not)
        seen: dict[str, int] = {}
        return [[seen.setdefault(k, len(seen)) for k in r.image_keys] for r in reqs]

    assert pattern(real) == pattern(fast)
    sim = to_sim(prof, fast)
    r0 = sim[0]
    assert r0.prompt_tokens == r0.prompt_len + 20 + sum(im.tokens + 2 for im in r0.images)


# -- shared device --------------------------------------------------------------------------------

def test_processor_sharing_slows_every_job_alike():
    env = simpy.Environment()
    dev = SharedDevice(env, capacity=1.0)
    done = {}

    def job(name, start, work):
        yield env.timeout(start)
        yield dev.run(work, 1.0)
        done[name] = env.now

    env.process(job("a", 0.0, 1.0))
    env.process(job("b", 0.0, 1.0))
    env.process(job("c", 3.0, 0.5))
    env.run()
    assert done["a"] == pytest.approx(2.0) and done["b"] == pytest.approx(2.0)  # each at half speed
    assert done["c"] == pytest.approx(3.5)  # alone again
    env2 = simpy.Environment()
    two = SharedDevice(env2, capacity=2.0)
    ends = []

    def j():
        yield two.run(1.0, 1.0)
        ends.append(env2.now)

    env2.process(j())
    env2.process(j())
    env2.run()
    assert ends == [pytest.approx(1.0), pytest.approx(1.0)]  # two cores: no slow-down


def test_capacity_curve_slows_oversubscribed_cores():
    """With a measured curve, 3 busy one-thread jobs on 2 cores share 1.5 cores' work, not 2."""
    curve = {"1": 1.0, "2": 2.0, "3": 1.5}
    dev0 = SharedDevice(simpy.Environment(), 2.0, capacity_curve=curve)
    assert dev0.capacity_at(1) == 1.0 and dev0.capacity_at(2) == 2.0
    assert dev0.capacity_at(2.5) == pytest.approx(1.75) and dev0.capacity_at(7) == 1.5
    ends = {}
    for cap in (None, curve):
        env = simpy.Environment()
        dev = SharedDevice(env, 2.0, capacity_curve=cap)
        out = []

        def j(env=env, dev=dev, out=out):
            yield dev.run(1.0, 1.0)
            out.append(env.now)

        for _ in range(3):
            env.process(j())
        env.run()
        ends[cap is None] = out
    assert ends[True] == [pytest.approx(1.5)] * 3  # 2 cores / 3 jobs
    assert ends[False] == [pytest.approx(2.0)] * 3  # 1.5 cores' work / 3 jobs


def test_simulated_decode_admits_and_preempts_with_the_real_scheduler(prof):
    """The simulator's decode runs epd.engine.decode_scheduler over epd.engine.blocks (the same
    admission watermark and youngest-first preemption as the service); a pool too small for the
    load fails requests at routing, and every block is back in the pool at the end."""
    from epd.engine.decode_scheduler import DecodeScheduler
    from epd.plan.stages import DecodeSim

    wl = _workload(prof, n=20, images=0, max_tokens=200, rate=float("inf"))
    sim = Simulator(prof, Deployment("E-P-D", Limits(kv_blocks=40, kv_block_size=16)), wl)
    res = sim.run()
    dec = next(i for i in sim.instances if isinstance(i, DecodeSim))
    assert isinstance(dec.sched, DecodeScheduler)
    assert dec.sched.allocator.num_free == 40 and not dec.sched.running and not dec.sched.queue
    assert res.stats["preempted"] == dec.preempted
    failed = [r for r in res.records if r.error]
    assert failed and len(failed) < 20 and all(r.status != 200 for r in failed)


def test_roles_of_one_process_share_its_threads():
    env = simpy.Environment()
    host = SharedDevice(env, capacity=2.0)
    ends = {}

    def job(name, group):
        yield host.run(1.0, 1.0, owner=name, group=group, group_cap=1.0)
        ends[name] = env.now

    env.process(job("encoder", "ep-0"))
    env.process(job("prefill", "ep-0"))  # same 1-thread process: they share one core
    env.process(job("decode", "decode-0"))  # its own process: the other core
    env.run()
    assert ends == {"encoder": pytest.approx(2.0), "prefill": pytest.approx(2.0), "decode": pytest.approx(1.0)}


# -- simulator ------------------------------------------------------------------------------------

def _figures(prof, dep, wl, rate=None):
    res = simulate(prof, dep, wl, rate)
    return res, compute_metrics(res.records, res.duration_s, {"ttft": 2000, "tpot": 50})


def test_simulation_is_deterministic_and_every_request_finishes(prof):
    wl = _workload(prof, n=30, images=2)
    a, fa = _figures(prof, Deployment("E-P-D"), wl)
    b, fb = _figures(prof, Deployment("E-P-D"), wl)
    assert [(r.ttft, r.latency, r.itl) for r in a.records] == [(r.ttft, r.latency, r.itl) for r in b.records]
    assert fa["completed"] == 30 and fa["failed"] == 0
    assert all(r.output_tokens == 16 for r in a.records)
    assert fa["requests_by_route"] == {"encode": 30}


def test_latency_grows_with_load(prof):
    wl = _workload(prof, n=40)
    ttft = [_figures(prof, Deployment("E-P-D"), wl, rate)[1]["median_ttft_ms"] for rate in (0.5, 3.0, 6.0, 20.0)]
    assert ttft == sorted(ttft) and ttft[-1] > 2 * ttft[0]


def test_colocation_slows_both_roles():
    acc = Profile.from_json(_raw(kind="accelerator", cores=1, threads=(1,)), "acc")
    wl = _workload(acc, n=30, images=2, rate=3.0)
    apart = Simulator(acc, Deployment("E-P-D"), wl)
    shared = Simulator(acc, Deployment("(E-P)-D"), wl)
    ra, rs = apart.run(), shared.run()
    busy_a, busy_s = ra.stats["instances"], rs.stats["instances"]
    assert busy_s["encoder-0"]["busy"] > busy_a["encoder-0"]["busy"]
    assert busy_s["prefill-0"]["busy"] > busy_a["prefill-0"]["busy"]
    med = lambda r: sorted(x.ttft for x in r.records)[len(r.records) // 2]  # noqa: E731
    assert med(rs) > med(ra)


def test_images_of_a_request_are_split_across_encoders_and_cached_ones_skip_encoding(prof):
    wl = _workload(prof, n=1, images=4, rate=1.0)
    sim = Simulator(prof, Deployment("2E-1P-1D"), wl)
    sim.run()
    assert sorted(e.items for e in sim.encoders) == [2, 2]  # intra-request parallelism
    wl2 = _workload(prof, n=12, images=1, rate=0.5, reuse_every=3)  # requests 3.. repeat images 0..2
    sim2 = Simulator(prof, Deployment("E-P-D"), wl2)
    res = sim2.run()
    routes = [r.route for r in res.records]
    assert routes[:3] == ["encode"] * 3 and routes[3:] == ["cached"] * 9
    assert sim2.encoders[0].items == 3 and res.stats["feature_cache_hits"] == 9


def test_encoder_batches_within_its_image_budget(prof):
    wl = _workload(prof, n=12, images=1, rate=float("inf"))
    sim = Simulator(prof, Deployment("E-P-D", Limits(encoder_max_images=4)), wl)
    sim.run()
    enc = sim.encoders[0]
    assert enc.items == 12 and enc.steps >= 3  # at most 4 images per forward


def test_layer_grouped_kv_hides_transfer(prof):
    wl = _workload(prof, n=1, images=0, rate=1.0)
    sim = Simulator(prof, Deployment("E-P-D", Limits(kv_layer_group=0)), wl)
    req = sim.reqs[0]
    whole = sim.prefills[0].kv_exposed([req], forward=0.01)
    grouped = Simulator(prof, Deployment("E-P-D", Limits(kv_layer_group=1)), wl).prefills[0].kv_exposed([req], 0.01)
    assert whole > grouped > 0


def test_a_small_kv_pool_fails_requests_instead_of_hanging(prof):
    wl = _workload(prof, n=20, images=0, max_tokens=200, rate=float("inf"))
    res, fig = _figures(prof, Deployment("E-P-D", Limits(kv_blocks=40, kv_block_size=16)), wl)
    assert fig["completed"] + fig["failed"] == 20
    assert fig["completed"] > 0


def test_text_requests_skip_the_encoder(prof):
    wl = _workload(prof, n=5, images=0)
    sim = Simulator(prof, Deployment("E-P-D"), wl)
    res = sim.run()
    assert {r.route for r in res.records} == {"text"} and sim.encoders[0].items == 0


# -- deployment -------------------------------------------------------------------------------------

def test_notation_and_env():
    assert notation("E-P-D", (1, 1, 1)) == "E-P-D"
    assert notation("E-P-D", (3, 1, 2)) == "3E-1P-2D"
    assert notation("(E-P)-D", (2, 1)) == "2(E-P)-1D"
    dep = Deployment("3E-1P-2D", Limits(decode_max_batch=128))
    assert dep.env() == {"EPD_TOPOLOGY": "3E-1P-2D", "EPD_DECODE_MAX_BATCH": "128"}
    assert dep.compose_env()["EPD_ENCODERS"] == "3"
    assert Deployment("EP-D").compose_env() is None
    assert [p.threads for p in Deployment("EP-D").place("cpu", 8)] == [6, 2]  # the launcher's split
    with pytest.raises(DeploymentError):
        Deployment("E-X")


# -- search -----------------------------------------------------------------------------------------

def test_exhaustive_and_optuna_agree_on_a_small_space(prof):
    wl = _workload(prof, n=16, images=2, max_tokens=8)
    space = SearchSpace(devices=3, shapes=("E-P-D", "EP-D"), encoder_max_images=(1, 8), prefill_max_tokens=(4096,),
                        kv_layer_group=(2,), decode_max_batch=(64,), routing=("least-loaded",))
    assert space.size() == 2 * (1 + 2)  # E-P-D (1,1,1); EP-D (1,2), (2,1)
    slo = {"ttft": 2000, "tpot": 50}
    ex = search(prof, space, wl, slo, exhaustive=True)
    op = search(prof, space, wl, slo, trials=24, seed=0)
    assert len(ex) == space.size()
    assert op[0].config == ex[0].config
    assert op[0].goodput == pytest.approx(ex[0].goodput)


def test_goodput_is_where_attainment_crosses_the_target(prof):
    wl = _workload(prof, n=30, images=1)
    g, how, pts = goodput(prof, Config("E-P-D", (1, 1, 1)).deployment(Limits()), wl, {"ttft": 1000, "tpot": 50})
    assert how == "interpolated" and g > 0
    below = [r for r, a in pts if a >= 0.9]
    above = [r for r, a in pts if a < 0.9]
    assert max(below) <= g <= min(above)


# -- CLI --------------------------------------------------------------------------------------------

def _epd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "epd.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


@pytest.mark.parametrize("argv, needle", [
    (["plan", "--profile", "/nonexistent/p.json", "--devices", "2"], "/nonexistent/p.json"),
    (["plan", "--profile", "{bad}", "--devices", "0"], "--devices"),
    (["plan", "--profile", "{good}"], "--devices N"),
    (["plan", "--profile", "{good}", "--topology", "E-Q"], "topology"),
    (["plan", "--profile", "{bad}", "--devices", "2"], "model.num_layers"),
    (["profile", "--model", "/nonexistent", "--out", "x.json"], "--model"),
    (["plan", "--profile", "{good}", "--devices", "2", "--device", "A100"], "not on 'A100'"),
    (["plan", "--profile", "{good}", "--devices", "2", "--model", "{other_model}"], "num_layers 4 vs 6"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, argv, needle):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_raw()))
    bad_raw = _raw()
    del bad_raw["model"]["num_layers"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bad_raw))
    other = tmp_path / "other-model"  # an HF config with 6 layers: not the profile's model (4)
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"num_hidden_layers": 6, "hidden_size": 256,
                                                   "num_key_value_heads": 2}))
    argv = [a.replace("{good}", str(good)).replace("{bad}", str(bad if needle != "--devices" else good))
            .replace("{other_model}", str(other)) for a in argv]
    proc = _epd(*argv)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_plan_prints_the_best_first_with_a_runnable_topology(tmp_path):
    from epd.topology import parse_topology

    good = tmp_path / "good.json"
    good.write_text(json.dumps(_raw()))
    proc = _epd("plan", "--profile", str(good), "--devices", "3", "--shapes", "E-P-D,EP-D", "--trials", "6",
                "--dataset-name", "random-mm", "--num-prompts", "12", "--random-output-len", "8",
                "--random-mm-bucket-config", "{(64, 64, 1): 1.0}", "--goodput", "ttft:2000", "tpot:50",
                "--disable-tqdm")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    first = next(ln for ln in out if ln.strip().startswith("1 "))
    env = next(ln for ln in out if "EPD_TOPOLOGY=" in ln)
    topo = env.split("EPD_TOPOLOGY=")[1].split()[0].strip("'")
    assert topo in first
    parse_topology(topo)


def test_search_runs_last_longer_than_the_ttft_slo(prof):
    wl = _workload(prof, n=10, images=1, reuse_every=5)
    longer = wl.extended(25)
    assert len(longer.requests) == 25 and longer.requests[10].prompt_tokens == wl.requests[0].prompt_tokens
    keys = [im.key for r in longer.requests for im in r.images]
    assert len(set(keys)) == 3 * 5  # each cycle repeats only the generator's own reuse
    assert wl.extended(5) is wl



def test_fit_is_the_least_squares_optimum_on_measured_samples():
    """The encode samples of a real profile (docs/plan/profile-tiny-avx512.json, 1 thread): the
    unconstrained solution has a negative coefficient there, and dropping features greedily left
    a 12 % median error; non-negative least squares fits them within 5 %."""
    from epd.plan.profile import FEATURES

    raw = json.loads((Path(__file__).resolve().parents[2] / "docs/plan/profile-tiny-avx512.json").read_text())
    samples = raw["stages"]["encode"]["1"]["samples"]
    coef, err = fit(FEATURES["encode"], samples)
    assert err < 0.05 and all(v >= 0 for v in coef.values())


def test_profile_refit_command(tmp_path, capsys):
    from epd.cli import main
    from epd.plan.profile import Profile

    src = Path(__file__).resolve().parents[2] / "docs/plan/profile-tiny-avx512.json"
    with pytest.raises(SystemExit) as done:
        main(["profile", "--refit", str(src), "--out", str(tmp_path / "refit.json")])
    assert done.value.code == 0
    assert "encode (1 thread): median relative error" in capsys.readouterr().out
    old, new = Profile.load(src), Profile.load(tmp_path / "refit.json")
    assert new.stages["encode"][1].median_rel_err <= old.stages["encode"][1].median_rel_err + 1e-9
    assert new.host == old.host and new.model == old.model
    with pytest.raises(SystemExit) as bad:
        main(["profile", "--refit", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.json")])
    assert bad.value.code == 2


def test_decode_fit_separates_a_lone_request_from_a_batch():
    """float32 decode on a 2-vCPU AVX2 EPYC (docs/plan/profile-mid-avx2.json, samples stored
    without ``multi``): batch 1 runs matrix-vector products, a batch GEMMs. Refitting backfills
    ``multi`` from each sample's batch and fits them closer; a profile without the coefficient
    loads with it at 0, its costs unchanged."""
    from epd.plan.profile import CostModel

    raw = json.loads((Path(__file__).resolve().parents[2] / "docs/plan/profile-mid-avx2.json").read_text())
    for t in ("1", "2"):
        stored = raw["stages"]["decode"][t]
        assert "multi" not in stored["coef"] and all("multi" not in s["x"] for s in stored["samples"])
        old = Profile.from_json(raw, "mid").stages["decode"][int(t)]
        assert old.coef["multi"] == 0.0
        assert old(decode_x(4, 512)) == pytest.approx(sum(v * decode_x(4, 512).get(k, 0.0)
                                                          for k, v in stored["coef"].items()))
        new = CostModel.fitted("decode", stored["samples"])
        assert new.coef["multi"] > 0.005 and new.median_rel_err < stored["median_rel_err"]
    assert CostModel.fitted("decode", [{"x": decode_x(b, 64), "s": 0.01 + 0.001 * b}
                                       for b in (1, 2, 4, 8)]).coef["multi"] == pytest.approx(0.0, abs=1e-9)
