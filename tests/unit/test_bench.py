"""``epd bench serve``: workloads are deterministic, figures equal hand-computed values, failures
are counted per status, bad input exits 2 with one line."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import threading

import numpy as np
import pytest
from aiohttp import web

from epd.bench.client import RunConfig, arrival_times, run_requests
from epd.bench.metrics import RequestRecord, compute_metrics, goodput_from_sweep, meets_slo, parse_goodput
from epd.bench.workloads import WorkloadArgs, WorkloadError, build_workload, parse_buckets
from tests.stub_openai import MODEL, make_app

pytest.importorskip("skimage")


# -- workloads ------------------------------------------------------------------------------

def _pixels(url: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


@pytest.mark.parametrize("name", ["random-mm", "epd-synthetic", "sharegpt4o-like", "visualwebinstruct-like"])
def test_workload_is_deterministic_for_a_seed(name):
    wl = WorkloadArgs(dataset_name=name, num_prompts=6, seed=3, epd_images=2)
    a, b = build_workload(wl), build_workload(wl)
    assert [(r.prompt, r.images, r.max_tokens) for r in a] == [(r.prompt, r.images, r.max_tokens) for r in b]
    c = build_workload(WorkloadArgs(dataset_name=name, num_prompts=6, seed=4, epd_images=2))
    assert [r.prompt for r in a] != [r.prompt for r in c]


def test_images_are_photographs_of_the_bucket_size_and_unique():
    reqs = build_workload(WorkloadArgs(dataset_name="random-mm", num_prompts=8, random_mm_base_items_per_request=2,
                                       random_mm_bucket_config="{(120, 200, 1): 0.5, (64, 64, 1): 0.5}"))
    keys = [k for r in reqs for k in r.image_keys]
    assert len(keys) == 16 and len(set(keys)) == 16  # reuse 0: every image new (no cache hit possible)
    for r in reqs:
        for url, size in zip(r.images, r.image_sizes, strict=True):
            px = _pixels(url)
            assert size in ((200, 120), (64, 64)) and px.shape[:2] == (size[1], size[0])
            assert px.std() > 10  # a photograph, not a solid colour


def test_image_salt_changes_every_image_but_not_the_shape():
    """Servers hash image bytes (mm_hash = sha256): a sweep's next rate must miss the cache."""
    a = build_workload(WorkloadArgs(dataset_name="sharegpt4o-like", num_prompts=12, image_reuse=0.5))
    b = build_workload(WorkloadArgs(dataset_name="sharegpt4o-like", num_prompts=12, image_reuse=0.5, image_salt=1))
    assert not {k for r in a for k in r.image_keys} & {k for r in b for k in r.image_keys}
    assert [(r.prompt, r.image_sizes, len(set(r.image_keys))) for r in a] == [
        (r.prompt, r.image_sizes, len(set(r.image_keys))) for r in b]
    reused = [[k in {x for q in reqs[:i] for x in q.image_keys} for k in r.image_keys] for reqs in (a, b)
              for i, r in enumerate(reqs)]
    assert reused[:12] == reused[12:]  # the same requests repeat an earlier image


def test_image_reuse_repeats_earlier_images():
    reqs = build_workload(WorkloadArgs(dataset_name="sharegpt4o-like", num_prompts=40, image_reuse=0.5))
    seen, repeats = set(), 0
    for r in reqs:
        repeats += all(k in seen for k in r.image_keys)
        seen.update(r.image_keys)
    assert 10 <= repeats <= 30
    none = build_workload(WorkloadArgs(dataset_name="sharegpt4o-like", num_prompts=10))
    assert len({k for r in none for k in r.image_keys}) == 10


def test_dataset_shapes():
    vwi = build_workload(WorkloadArgs(dataset_name="visualwebinstruct-like", num_prompts=6))
    assert [len(r.images) for r in vwi] == [1, 0, 1, 0, 1, 0]
    assert all(s == (1280, 720) for r in vwi for s in r.image_sizes) and all(r.max_tokens == 64 for r in vwi)
    epd = build_workload(WorkloadArgs(dataset_name="epd-synthetic", num_prompts=2, epd_images=6))
    assert all(len(r.images) == 6 and r.max_tokens == 10 and r.prompt_len == 22 for r in epd)
    rmm = build_workload(WorkloadArgs(dataset_name="random-mm", num_prompts=30, random_input_len=20,
                                      random_range_ratio=0.5, random_mm_base_items_per_request=2,
                                      random_mm_num_mm_items_range_ratio=1.0, random_mm_limit_mm_per_prompt=3,
                                      random_mm_bucket_config="{(32, 32, 1): 1}"))
    assert all(10 <= r.prompt_len <= 30 and 0 <= len(r.images) <= 3 for r in rmm)
    assert len({len(r.images) for r in rmm}) > 1


def test_exact_prompt_lengths_with_a_tokenizer(tiny_model):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    reqs = build_workload(WorkloadArgs(dataset_name="random-mm", num_prompts=5, random_input_len=37,
                                       tokenizer=str(tiny_model), random_mm_base_items_per_request=0))
    for r in reqs:
        assert abs(len(tok.encode(r.prompt, add_special_tokens=False).ids) - 37) <= 1 and r.prompt_len == len(
            tok.encode(r.prompt, add_special_tokens=False).ids)


def test_jsonl_workload_and_its_errors(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.png")
    f = tmp_path / "w.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "images": ["a.png"], "max_tokens": 5}) + "\n"
                 + json.dumps({"text": "no image"}) + "\n")
    reqs = build_workload(WorkloadArgs(dataset_name="jsonl", dataset_path=str(f), num_prompts=3))
    assert [r.prompt for r in reqs] == ["hi", "no image", "hi"] and reqs[0].image_sizes == [(40, 30)]
    assert reqs[0].images[0].startswith("data:image/png;base64,") and reqs[0].max_tokens == 5
    f.write_text(json.dumps({"prompt": "x"}) + "\n" + json.dumps({"prompt": "y", "images": ["gone.jpg"]}) + "\n")
    with pytest.raises(WorkloadError, match=r"w.jsonl:2: image file gone.jpg not found"):
        build_workload(WorkloadArgs(dataset_name="jsonl", dataset_path=str(f), num_prompts=1))
    with pytest.raises(WorkloadError, match="needs --dataset-path"):
        build_workload(WorkloadArgs(dataset_name="jsonl"))


def test_bucket_config_is_vllms_syntax():
    assert parse_buckets("{(256, 256, 1): 0.5, (720, 1280, 1): 1.5}") == [((256, 256), 0.25), ((1280, 720), 0.75)]
    for bad in ("{(256, 256, 4): 1}", "[1, 2]", "{(1, 2): 1}", "nope("):
        with pytest.raises(WorkloadError):
            parse_buckets(bad)


# -- figures from a synthetic trace ---------------------------------------------------------

def _trace() -> list[RequestRecord]:
    a = RequestRecord(success=True, status=200, sent_at=0.0, ttft=0.100, itl=[0.020, 0.030], latency=0.150,
                      output_tokens=3, prompt_len=10, route="encode")
    b = RequestRecord(success=True, status=200, sent_at=0.5, ttft=0.300, itl=[0.050], latency=0.350,
                      output_tokens=2, prompt_len=20, route="cached")
    c = RequestRecord(success=False, status=503, error="overloaded", sent_at=1.0, latency=0.01)
    d = RequestRecord(success=False, status=200, error="midstream: x", sent_at=1.2, ttft=0.1, latency=0.2,
                      output_tokens=1)
    return [a, b, c, d]


def test_figures_equal_hand_computed_values():
    res = compute_metrics(_trace(), duration_s=2.0, slo={"ttft": 200, "tpot": 30}, percentiles=(90,))
    assert res["completed"] == 2 and res["failed"] == 2
    assert res["total_input_tokens"] == 30 and res["total_output_tokens"] == 5
    assert res["request_throughput"] == pytest.approx(1.0) and res["output_throughput"] == pytest.approx(2.5)
    assert res["mean_ttft_ms"] == pytest.approx(200.0) and res["median_ttft_ms"] == pytest.approx(200.0)
    assert res["p90_ttft_ms"] == pytest.approx(280.0)  # linear between 100 and 300
    # TPOT excludes the first token: (150-100)/(3-1) = 25 ms and (350-300)/(2-1) = 50 ms.
    assert res["mean_tpot_ms"] == pytest.approx(37.5) and res["median_tpot_ms"] == pytest.approx(37.5)
    assert res["mean_itl_ms"] == pytest.approx(100 / 3) and res["median_itl_ms"] == pytest.approx(30.0)
    assert res["mean_e2el_ms"] == pytest.approx(250.0)
    # Both SLOs: a meets them (100 ms, 25 ms); b misses TTFT; failures count as misses.
    assert res["slo_attainment"] == pytest.approx(0.25) and res["request_goodput"] == pytest.approx(0.5)
    assert res["requests_by_route"] == {"encode": 1, "cached": 1}
    assert res["median_ttft_ms_by_route"] == {"encode": pytest.approx(100.0), "cached": pytest.approx(300.0)}
    assert res["errors_by_status"] == {"503": 1, "midstream": 1}


def test_slo_needs_both_ttft_and_tpot():
    a = _trace()[0]
    assert meets_slo(a, {"ttft": 100, "tpot": 25})
    assert not meets_slo(a, {"ttft": 99, "tpot": 25}) and not meets_slo(a, {"ttft": 100, "tpot": 24})
    one = RequestRecord(success=True, status=200, ttft=0.1, latency=0.1, output_tokens=1)
    assert one.tpot is None and meets_slo(one, {"ttft": 100, "tpot": 1})
    assert parse_goodput(["ttft:2000", "tpot:50"]) == {"ttft": 2000.0, "tpot": 50.0}
    for bad in (["ttft"], ["itl:5"], ["tpot:-1"], ["ttft:abc"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_goodput_interpolates_between_rates():
    assert goodput_from_sweep([(4, 0.5), (1, 1.0), (2, 0.95)]) == (pytest.approx(2 + 0.05 / 0.45 * 2), "interpolated")
    assert goodput_from_sweep([(1, 1.0), (2, 0.9), (3, 0.2)]) == (pytest.approx(2.0), "interpolated")
    assert goodput_from_sweep([(1, 0.99), (2, 0.95)]) == (2, "lower-bound")
    assert goodput_from_sweep([(1, 0.5), (2, 0.95)]) == (None, "below-range")
    with pytest.raises(ValueError):
        goodput_from_sweep([(math.inf, 1.0)])


def test_arrivals_follow_rate_and_burstiness():
    t = arrival_times(20000, rate=4.0, burstiness=1.0, seed=1)
    gaps = np.diff(t)
    assert t[0] == 0 and gaps.mean() == pytest.approx(0.25, rel=0.03) and gaps.std() == pytest.approx(0.25, rel=0.05)
    bursty = np.diff(arrival_times(20000, rate=4.0, burstiness=0.25, seed=1))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05) and bursty.std() == pytest.approx(0.5, rel=0.1)
    assert (arrival_times(5, math.inf, 1.0, 0) == 0).all()
    assert (arrival_times(50, 2.0, 1.0, 7) == arrival_times(50, 2.0, 1.0, 7)).all()
    with pytest.raises(ValueError):
        arrival_times(3, -1.0, 1.0, 0)


# -- against a stub server -------------------------------------------------------------------

def _serve_stub(app: web.Application):
    from tests.conftest import free_port

    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = web.AppRunner(app, access_log=None)

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(10)
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


@pytest.fixture()
def stub_url():
    """The stub on a free port in a thread; every 4th request 503, every 5th mid-stream error,
    every 7th cut without [DONE]."""
    yield from _serve_stub(make_app(fail_every=4, midstream_every=5, cut_every=7))


def test_a_stream_that_ends_on_finish_reason_without_done_succeeds():
    """transformers serve ends its streams with a finish_reason chunk and no [DONE]."""
    for url in _serve_stub(make_app(hf_style=True)):
        run = asyncio.run(run_requests(RunConfig(url, MODEL, progress=False), _text_requests(3, 5)))
        assert [(r.success, r.output_tokens) for r in run.records] == [(True, 5)] * 3


def _text_requests(n: int, tokens: int):
    from epd.bench.workloads import BenchRequest

    return [BenchRequest(prompt=f"p{i}", max_tokens=tokens) for i in range(n)]


def test_failures_are_counted_per_status_and_the_run_completes(stub_url):
    reqs = build_workload(WorkloadArgs(dataset_name="random-mm", num_prompts=28, random_output_len=8,
                                       random_mm_bucket_config="{(32, 32, 1): 1}"))
    run = asyncio.run(run_requests(RunConfig(stub_url, MODEL, request_rate=500.0, max_concurrency=8,
                                             progress=False), reqs))
    res = compute_metrics(run.records, run.duration_s)
    # n % 4 == 0 -> 503 (7 of 28); of the rest, n % 5 == 0 -> mid-stream (5, 10, 15, 25: 4);
    # n % 7 == 0 and not yet failed -> cut (7, 14, 21: 3).
    assert res["errors_by_status"] == {"503": 7, "midstream": 7}
    assert res["completed"] == 14 and len(run.records) == 28 and not run.interrupted
    assert res["total_output_tokens"] == 14 * 8 and res["requests_by_route"] == {"stub": 14}
    assert all(len(r.itl) == 7 for r in run.records if r.success)


def _cli(*argv: str) -> int:
    from epd.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return exc.value.code


def test_cli_run_writes_a_result(stub_url, tmp_path, capsys):
    code = _cli("bench", "serve", "--base-url", stub_url, "--dataset-name", "epd-synthetic", "--epd-images", "1",
                "--num-prompts", "12", "--request-rate", "200", "--goodput", "ttft:1000", "tpot:100",
                "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json", "--disable-tqdm")
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text())
    for key in ("completed", "failed", "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                "p99_ttft_ms", "mean_tpot_ms", "p90_itl_ms", "median_e2el_ms", "slo_attainment", "request_goodput"):
        assert key in res
    assert res["completed"] + res["failed"] == 12 and res["model_id"] == MODEL and res["request_rate"] == 200
    assert (tmp_path / "r.cdf.png").stat().st_size > 10_000
    assert "Serving Benchmark" not in capsys.readouterr().err


def test_cli_sweep_reports_goodput_and_plots(stub_url, tmp_path, capsys):
    code = _cli("bench", "serve", "--base-url", stub_url, "--dataset-name", "random-mm", "--random-output-len", "4",
                "--random-mm-bucket-config", "{(32, 32, 1): 1}", "--num-prompts", "8", "--sweep-rates", "100,50",
                "--save-result", "--result-dir", str(tmp_path), "--result-filename", "s.json", "--disable-tqdm")
    assert code == 0
    res = json.loads((tmp_path / "s.json").read_text())
    assert [e["request_rate"] for e in res["sweep"]] == [50, 100]
    assert res["goodput_how"] == "below-range" and res["goodput"] is None  # 1 in 4 fails at any rate
    assert (tmp_path / "s.attainment.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--base-url", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
    (["--model", "nope"], "model 'nope' is not served"),
    (["--request-rate", "-1"], "request rate must be > 0"),
    (["--dataset-name", "jsonl", "--dataset-path", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    (["--goodput", "ttft:x"], "is not a number"),
])
def test_bad_input_is_one_line_and_exit_2(stub_url, capsys, argv, message):
    base = [] if "--base-url" in argv else ["--base-url", stub_url]
    assert _cli("bench", "serve", *base, *argv, "--disable-tqdm", "--num-prompts", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and len([e for e in err if e.startswith(("epd bench serve", "usage", "epd"))]) >= 1


def test_ctrl_c_stops_the_run_and_still_writes_what_was_measured(tmp_path):
    """SIGINT mid-run: exit 130, the finished requests are in the JSON, the rest are unfinished."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import free_port

    port = free_port()
    stub = subprocess.Popen([sys.executable, "-m", "tests.stub_openai", "--port", str(port), "--token-delay", "0.05"])
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                import urllib.request

                urllib.request.urlopen(f"{url}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        bench = subprocess.Popen(
            [sys.executable, "-m", "epd.cli", "bench", "serve", "--base-url", url, "--dataset-name", "random-mm",
             "--random-mm-base-items-per-request", "0", "--random-output-len", "10", "--num-prompts", "200",
             "--request-rate", "10", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json",
             "--disable-tqdm"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        bench.send_signal(signal.SIGINT)
        out, err = bench.communicate(timeout=30)
    finally:
        stub.terminate()
        stub.wait(10)
    assert bench.returncode == 130, err[-1500:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["interrupted"] is True and res["completed"] >= 5 and res["failed"] == 0
    assert res["completed"] + res["unfinished"] == 200 and "Interrupted" in out


def test_deployment_file_names_keep_colocation_distinct():
    from epd.topology import file_part

    names = {file_part(t) for t in ("E-P-D", "(E-P)-D", "E-(P-D)", "EP-D", "E-P-D@bfloat16")}
    assert len(names) == 5 and "E-P-coloc-D" in names and "E-P-D-bfloat16" in names
    assert all("(" not in n and ")" not in n and "@" not in n for n in names)
