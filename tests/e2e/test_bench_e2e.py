"""``epd bench serve`` against a real ``epd up`` (tiny model): 20 requests at a low rate give a
valid result with zero errors, and the cached route shows up when images repeat."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model):
    from epd.bench.compare import start_ours

    run = start_ours("E-P-D", tiny_model, tmp_path_factory.mktemp("bench_logs"), startup_timeout_s=180)
    yield run
    run.stop()


def test_twenty_requests_at_a_low_rate_against_epd_up(deployment, tiny_model, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "epd.cli", "bench", "serve", "--base-url", deployment.url, "--tokenizer",
         str(tiny_model), "--dataset-name", "random-mm", "--random-input-len", "12", "--random-output-len", "8",
         "--random-mm-bucket-config", "{(224, 224, 1): 0.5, (336, 448, 1): 0.5}", "--num-prompts", "20",
         "--request-rate", "4", "--image-reuse", "0.3", "--ignore-eos", "--goodput", "ttft:20000", "tpot:5000",
         "--num-warmups", "2", "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
         "--result-filename", "r.json", "--disable-tqdm"],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["completed"] == 20 and res["failed"] == 0 and res["errors_by_status"] == {}
    assert res["total_output_tokens"] == 20 * 8 and res["output_lens"] == [8] * 20
    assert res["slo_attainment"] == 1.0 and res["request_throughput"] > 0
    assert 0 < res["median_ttft_ms"] < res["median_e2el_ms"] and res["median_tpot_ms"] > 0
    assert set(res["requests_by_route"]) <= {"encode", "cached"} and res["requests_by_route"].get("cached", 0) >= 1
    assert sum(res["requests_by_route"].values()) == 20
    assert "Serving Benchmark" not in out.stderr and "Successful requests:" in out.stdout
