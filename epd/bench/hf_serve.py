"""The benchmark's peer: Hugging Face's own ``transformers serve`` on a local model directory.

``python -m epd.bench.hf_serve --model DIR [--host H] [--port N] [--dtype auto|float32|bfloat16]
[--device cpu] [--threads N] [-- extra transformers-serve args]`` runs
``transformers serve DIR --host H --port N --dtype D --device cpu ...`` in this process, through
transformers' own CLI entry point (``transformers.cli.transformers.main``), unchanged. The one
shim: ``AutoProcessor.from_pretrained`` gives an image-only ``Qwen2VLProcessor`` for a Qwen2-VL
directory (the stock one needs torchvision for its video processor; see
:func:`patch_auto_processor`). Nothing about generation is touched.

The directory is FORCE_MODEL: the model loads before uvicorn starts (so ``/health`` answers only
once it is loaded), requests must name it as the same string or omit ``model`` (400 otherwise),
and responses say ``"model": "<dir>@main"``. ``/v1/models`` lists the HF cache, not the directory.

How it behaves for benchmarking (transformers 5.23, tiny Qwen2-VL, CPU; by experiment):

==============================  ===============================================================
request                         transformers serve
==============================  ===============================================================
``ignore_eos``, ``min_tokens``, 422 "Unexpected fields": only OpenAI's fields plus ``seed``,
``top_k``                       ``generation_config``, ``chat_template_kwargs`` are accepted.
                                ignore_eos equivalent: ``max_tokens: N`` with
                                ``"generation_config": '{"min_new_tokens": N}'`` (a JSON
                                *string*; unset fields come from generation_config.json, so EOS
                                stays known and is masked: with EOS forced by ``logit_bias``,
                                1 token without it, N with it).
``max_tokens`` /                both honoured; ``max_completion_tokens`` wins if both are given;
``max_completion_tokens``       neither: max(generation_config.json's max_new_tokens, 1024).
``temperature: 0``              greedy (do_sample=False). ``temperature > 0`` does NOT turn
                                sampling on: do_sample stays as generation_config.json says
                                (false for our presets); ``generation_config: '{"do_sample":
                                true}'`` does. The base config is a copy of generation_config.json,
                                so e.g. a ``repetition_penalty`` there applies to every request.
``seed``                        accepted: ``torch.manual_seed`` process-wide when the request is
                                parsed, not when its generation starts (reproducible only one
                                request at a time).
``stream: true``                role chunk, one chunk per decoded piece, then one chunk with
                                ``finish_reason`` AND ``usage`` (``choices`` not empty). No
                                ``data: [DONE]``: the stream just ends.
``stream_options``              ignored (logged); usage is always on the last chunk.
``include_usage``               ``completion_tokens`` counts an EOS token (EOS first: 1, text "").
``image_url`` data URL          JPEG and PNG accepted; HF ``Qwen2VLImageProcessor`` resizing, same
                                prompt_tokens as ours (297 for the 448x448 astronaut).
several images                  accepted (two photos: 546 prompt tokens).
``stop``                        500: serve passes the processor as ``tokenizer=`` to generate and
                                ``StopStringCriteria`` calls ``get_vocab`` on it (the stock
                                processor has none either).
``n`` > 1                       ignored (logged): one choice.
non-streamed ``content``        leading whitespace stripped by the response parser (streamed
                                text keeps it: ``" exhaust..."`` vs ``"exhaust..."``).
concurrent requests             serialised: one inference thread per model, FIFO, no batching;
                                request k's first token follows request k-1's last. Image
                                preprocessing runs on the event loop, so queued requests slow the
                                running one: 64 tokens took 1.1 s alone, 4 at once 9.5 s wall
                                (2 cores); chunks of a queued request can arrive in bursts.
``--continuous-batching``       accepted, but Qwen2VLForConditionalGeneration falls back to
                                sequential generate ("does not support continuous batching":
                                serve uses CB only for text-only models), images or not; same
                                output, same serialisation.
==============================  ===============================================================

Greedy equality with our deployment (same directory, fp32, one JPEG photo + text, 16 tokens,
streamed) is checked token for token in ``tests/e2e/test_bench_peer.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

_PARENT_POLL_S = 1.0


def _is_qwen2_vl_dir(path) -> bool:
    """True for a local directory whose ``config.json`` says ``model_type: qwen2_vl``."""
    config = Path(str(path)) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "qwen2_vl"
    except (OSError, ValueError, AttributeError):
        return False


def patch_auto_processor() -> None:
    """Make ``AutoProcessor.from_pretrained`` build an image-only ``Qwen2VLProcessor`` for a
    local Qwen2-VL directory; every other call goes to the original.

    ``transformers serve`` loads its processor with ``AutoProcessor.from_pretrained`` (imported
    at call time in ``cli/serving/model_manager.py::ModelManager._load_processor``), so patching
    the class attribute is enough. The stock processor cannot be built here: its
    ``Qwen2VLVideoProcessor`` needs torchvision. The replacement is
    :func:`epd.models.hf_reference.hf_processor` with the directory's chat template (the stock
    processor reads the same ``chat_template.jinja`` the tokenizer does); nothing about
    generation is touched.
    """
    from transformers import AutoProcessor

    from epd.models.hf_reference import hf_processor

    original = AutoProcessor.from_pretrained

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if not _is_qwen2_vl_dir(pretrained_model_name_or_path):
            return original(pretrained_model_name_or_path, *args, **kwargs)
        processor = hf_processor(Path(pretrained_model_name_or_path))
        processor.chat_template = processor.tokenizer.chat_template
        return processor

    AutoProcessor.from_pretrained = classmethod(from_pretrained)


def _exit_with_parent(parent: int) -> None:
    """SIGTERM this process once ``parent`` is gone, so no orphaned server holds the model."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m epd.bench.hf_serve",
        description="Run `transformers serve` (unchanged) pinned to a local model directory; "
        "arguments after `--` go to `transformers serve` as they are.",
    )
    parser.add_argument("--model", required=True, help="local model directory (becomes FORCE_MODEL)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | ... (transformers' --dtype)")
    parser.add_argument("--device", default="cpu", help="transformers' --device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (inter-op: 1)")
    parser.add_argument("--exit-with-parent", type=int, default=None, metavar="PID", help=argparse.SUPPRESS)
    return parser.parse_args(argv), extra


def _serve_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The ``transformers serve`` command line (without the program name) for ``args``."""
    return [
        "serve",
        str(args.model),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        *extra,
    ]


def main(argv: list[str] | None = None) -> None:
    """Set threads, patch the processor lookup, then run ``transformers serve`` in this process.

    Blocks until the server stops. Raises ``SystemExit`` as transformers' CLI (click) does.
    """
    args, extra = _parse(sys.argv[1:] if argv is None else argv)
    if args.exit_with_parent is not None:
        _exit_with_parent(args.exit_with_parent)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
    patch_auto_processor()
    from transformers.cli import transformers as transformers_cli

    sys.argv = ["transformers", *_serve_argv(args, extra)]
    transformers_cli.main()


def start_peer(
    model_dir: Path | str,
    port: int,
    *,
    host: str = "127.0.0.1",
    dtype: str = "float32",
    threads: int | None = None,
    log_path: Path | str | None = None,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> subprocess.Popen:
    """Start ``python -m epd.bench.hf_serve`` for ``model_dir`` on ``host:port``; returns at once.

    Requests must name the model as ``str(model_dir)`` exactly (or omit ``model``): the server
    is pinned to that string and answers 400 for any other. ``threads`` sets torch's intra-op
    threads (and OMP_NUM_THREADS); ``extra_args`` go to ``transformers serve`` (e.g.
    ``["--continuous-batching"]``). stdout and stderr go to ``log_path`` (appended) or are
    discarded. ``env`` is added to this process's environment; the Hub is kept offline
    (``HF_HUB_OFFLINE=1``, no update check) unless ``env`` says otherwise. The server exits
    by itself when this process dies. Wait with :func:`wait_ready`; stop with ``terminate()``.
    """
    cmd = [
        sys.executable,
        "-m",
        "epd.bench.hf_serve",
        "--model",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--exit-with-parent",
        str(os.getpid()),
    ]
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        cmd += ["--threads", str(threads)]
        child_env["OMP_NUM_THREADS"] = str(threads)
    if extra_args:
        cmd += ["--", *extra_args]
    child_env.update(env or {})
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, env=child_env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if out is not subprocess.DEVNULL:
            out.close()


class PeerNotReady(RuntimeError):
    """The peer server exited or did not answer in time; the message carries its log tail."""


def _log_tail(log_path: Path | str | None, chars: int = 3000) -> str:
    if log_path is None:
        return "(no log: start_peer was given no log_path)"
    try:
        return Path(log_path).read_text(errors="replace")[-chars:]
    except OSError as err:
        return f"(log unreadable: {err})"


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (OSError, ValueError):  # refused while starting, 503, bad URL
        return False


def _probe(base_url: str, model: str) -> None:
    """One 1-token chat request naming ``model``; raises ``PeerNotReady`` if it is refused."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    req = urllib.request.Request(
        f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
    except urllib.error.HTTPError as err:
        raise PeerNotReady(f"{base_url} refused model {model!r}: HTTP {err.code} {err.read()[:500]!r}") from err


def wait_ready(
    base_url: str,
    model: str,
    timeout_s: float,
    *,
    proc: subprocess.Popen | None = None,
    log_path: Path | str | None = None,
) -> None:
    """Block until the peer at ``base_url`` (``http://host:port``, no ``/v1``) serves ``model``.

    Polls ``GET /health`` every 0.2 s (it answers only once the pinned model is loaded: the
    model loads before uvicorn starts), then sends one 1-token chat request naming ``model``
    (``/v1/models`` cannot be used: it lists the HF cache, not the pinned directory).

    Raises ``PeerNotReady`` (with the tail of ``log_path``) if ``proc`` exits first, if
    ``timeout_s`` seconds pass, or if the server refuses ``model``.
    """
    deadline = time.monotonic() + timeout_s
    while not _get_ok(f"{base_url}/health"):
        if proc is not None and proc.poll() is not None:
            raise PeerNotReady(
                f"transformers serve exited with {proc.returncode} before it was ready; "
                f"log tail:\n{_log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise PeerNotReady(
                f"transformers serve not ready at {base_url} after {timeout_s:.0f} s; log tail:\n{_log_tail(log_path)}"
            )
        time.sleep(0.2)
    _probe(base_url, model)


if __name__ == "__main__":
    main()
