"""The benchmark's peer (``transformers serve`` via :mod:`epd.bench.hf_serve`) and our deployment
give the same greedy text for the same streaming chat request on the same tiny model (fp32).

If this fails, the comparison in ``epd bench compare`` is not like for like (chat template,
special tokens, image resizing or EOS handling differ), not merely slower or faster.
"""

from __future__ import annotations

import base64
import io

import pytest

from tests.conftest import free_port
from tests.e2e.cluster import start_cluster
from tests.e2e.http import post_stream
from tests.model_fixtures import sample_photos

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MAX_NEW = 16


@pytest.fixture()
def peer(tmp_path, tiny_model):
    """``transformers serve`` on the tiny model, started (not yet ready: see ``wait_ready``)."""
    from epd.bench.hf_serve import start_peer

    port, log = free_port(), tmp_path / "peer.log"
    proc = start_peer(tiny_model, port, dtype="float32", threads=1, log_path=log)
    yield proc, f"http://127.0.0.1:{port}", log
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture()
def cluster(tmp_path, clean_redis, tiny_model):
    c = start_cluster(tmp_path, clean_redis, tiny_model)
    yield c
    c.stop()


def _jpeg_data_url(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _stream(url: str, body: dict) -> tuple[str, dict]:
    """Streamed text and the usage of the chunk that carries it."""
    status, chunks, _ = post_stream(f"{url}/v1/chat/completions", body)
    assert status == 200
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    usage = next(c["usage"] for c in reversed(chunks) if c.get("usage"))
    return text, usage


def test_greedy_text_matches_transformers_serve(peer, cluster, tiny_model):
    from epd.bench.hf_serve import wait_ready

    proc, peer_url, log = peer
    wait_ready(peer_url, str(tiny_model), 60, proc=proc, log_path=log)
    body = {
        "model": str(tiny_model),
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _jpeg_data_url(sample_photos()["astronaut"])}},
                    {"type": "text", "text": "What is in this picture?"},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": MAX_NEW,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    theirs, their_usage = _stream(peer_url, body)
    ours, our_usage = _stream(cluster.url, body)
    assert theirs
    assert ours == theirs
    assert our_usage["prompt_tokens"] == their_usage["prompt_tokens"]
    assert our_usage["completion_tokens"] == their_usage["completion_tokens"]
