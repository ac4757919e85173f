"""Serving-engine measurements on one machine, in one process, with the real components.

1. Decode throughput (tokens/s) of the continuous-batching engine (paged KV pool, batched
   forward, per-request sampling; driven through ``epd.engine.local.LocalPipeline``) at batch
   1, 8, 32 vs the same model's batched HF ``generate`` (greedy, KV cache, equal-length
   prompts so no padding) in the same run.
   Decode only: from the first generated token's logits to the last, on both sides.
2. Prefill throughput (prompt tokens/s): packed prefill of one prompt vs an in-process HF
   forward of the same inputs (``use_cache=True``).
3. KV transfer prefill → decode through the Mooncake transfer engine (tcp), driven through
   the ``PrefillEngine`` with its one-sided ``KvSender`` connector: bytes, GB/s and the
   *exposed* time (from the last layer's K/V to the last write done) for layer group G = 0
   (baseline: everything after the forward) and G = 1, 2, 4.
4. Feature prefetch: one image's features READ from an "encoder" pool while the request
   waits behind another prefill batch: read time and how much of it the wait hid.

    .venv/bin/epd model build --preset mid --out models/mid
    .venv/bin/python benchmarks/engine.py --model models/mid --out benchmarks/results/engine.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epd.engine.kv_pool import KvLayout, KvPool  # noqa: E402
from epd.engine.local import LocalPipeline  # noqa: E402
from epd.engine.region_alloc import RangeAllocator  # noqa: E402
from epd.engine.sampling import SamplingParams  # noqa: E402
from epd.models.qwen2_runner import Qwen2VLRunner  # noqa: E402
from epd.models.qwen2_vl import Qwen2VLAdapter  # noqa: E402
from epd.transfer import create_backend  # noqa: E402
from services.prefill.engine import PrefillEngine  # noqa: E402
from services.prefill.feature_reader import LocalFeatureReader  # noqa: E402
from services.prefill.kv_connector import KvSlot  # noqa: E402
from services.prefill.kv_sender import KvSender  # noqa: E402
from services.prefill.records import KvTarget, PrefillRequest  # noqa: E402


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 20, (length,), generator=g).tolist() for _ in range(batch)]


def ours_decode(adapter, batch_prompts, new_tokens: int) -> float:
    """Seconds spent in decode steps producing ``new_tokens`` per request (prefill excluded):
    the in-process engines (:class:`LocalPipeline`), timed from the first decode step to the last."""
    layout = KvLayout(adapter.num_layers, 4096, 16, adapter.num_kv_heads, adapter.head_dim)
    pipe = LocalPipeline(adapter, KvPool(layout), max_batch=len(batch_prompts), features_bytes=1 << 20)
    params = SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True)
    for i, p in enumerate(batch_prompts):
        pipe.submit(str(i), p, [], params)
    pipe.step()  # admits every request, prefills them in one packed forward, starts them
    t0 = time.perf_counter()
    produced = 0
    while pipe.num_requests:
        produced += len(pipe.step())
    elapsed = time.perf_counter() - t0
    assert produced == new_tokens * len(batch_prompts), produced
    return elapsed


class _StepClock:
    """A ``LogitsProcessor`` that only records when each generation step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_decode(model, batch_prompts, new_tokens: int, pad_id: int) -> float:
    """Seconds HF ``generate`` spends producing ``new_tokens`` tokens after the first one.

    Timed between the logits of the first generated token (end of the prompt pass) and those
    of the last, as ours is timed from its first decode step to its last.
    """
    from transformers import LogitsProcessorList

    ids = torch.tensor(batch_prompts)
    clock = _StepClock()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, pad_token_id=pad_id,
                             logits_processor=LogitsProcessorList([clock]))
    assert out.shape[1] == ids.shape[1] + new_tokens + 1 and len(clock.times) == new_tokens + 1
    return clock.times[-1] - clock.times[0]


def bench_decode(adapter, runner, model, args) -> list[dict]:
    rows = []
    for batch in (1, 8, 32):
        ps = prompts(batch, args.prompt_len, adapter.vocab_size, args.seed + batch)
        ours_decode(adapter, ps[:1], 2)  # warm-up
        ours_t, hf_t = [], []
        for _ in range(args.reps):  # interleaved, so drift in machine speed hits both sides alike
            ours_t.append(ours_decode(adapter, ps, args.new_tokens))
            hf_t.append(hf_decode(model, ps, args.new_tokens, adapter.eos_token_ids[-1]))
        ours, hf = min(ours_t), min(hf_t)
        tok = batch * args.new_tokens
        rows.append({"batch": batch, "ours_tok_s": tok / ours, "hf_tok_s": tok / hf, "ratio": hf / ours})
    return rows


def bench_prefill(adapter, runner, model, args) -> dict:
    p = prompts(1, args.prefill_len, adapter.vocab_size, args.seed)[0]
    e, pos, _ = adapter.prompt_inputs(p, [], [])
    ids = torch.tensor([p])

    def ours():
        t0 = time.perf_counter()
        runner.prefill(e, pos, [len(p)])
        return time.perf_counter() - t0

    def hf():
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=True)
        return time.perf_counter() - t0

    ours(), hf()
    samples = [(ours(), hf()) for _ in range(args.reps)]  # interleaved
    t_ours = statistics.median(s[0] for s in samples)
    t_hf = statistics.median(s[1] for s in samples)
    return {"tokens": len(p), "ours_tok_s": len(p) / t_ours, "hf_tok_s": len(p) / t_hf, "ratio": t_hf / t_ours}


def bench_kv_transfer(adapter, runner, args) -> list[dict]:
    p = prompts(1, args.prefill_len, adapter.vocab_size, args.seed + 7)[0]
    rows = []
    with create_backend("mooncake", timeout_s=60) as p_side, create_backend("mooncake", timeout_s=60) as d_side:
        layout = KvLayout(adapter.num_layers, layout_blocks := 1024, 16, adapter.num_kv_heads, adapter.head_dim)
        d_region = d_side.allocate(layout.nbytes, "kv")
        region = p_side.allocate(layout.with_blocks(layout.blocks_for(len(p))).nbytes + (1 << 20), "prefill")
        staging = RangeAllocator(region.nbytes)
        # a fragmented block table, as after some churn: runs of 4 consecutive blocks
        table = [b for start in range(0, layout_blocks, 8) for b in range(start, start + 4)]
        table = table[: layout.blocks_for(len(p))]
        target = KvTarget(d_region.handle, layout, tuple(table))
        for group in (0, 1, 2, 4):
            sender = KvSender(p_side, region, staging, adapter.num_layers, group)
            engine = PrefillEngine(adapter, sender, LocalFeatureReader({}), len(p), staging=staging, runner=runner)
            exposed, nbytes, totals = [], 0, []
            for _ in range(args.reps):
                engine.add(PrefillRequest("r", p, 0, SamplingParams(max_tokens=2, ignore_eos=True), math.inf))
                engine.set_kv_target("r", target)
                t0 = time.perf_counter()
                engine.step()  # the forward, layer groups written while later layers compute
                res = engine.step()  # the rest written and waited for: the exposed time
                totals.append(time.perf_counter() - t0)
                assert len(res.handoffs) == 1 and not res.failed
                exposed.append(res.kv_exposed_s)
                nbytes = res.kv_bytes
            rows.append({"group": group, "bytes": nbytes, "exposed_ms": 1e3 * statistics.median(exposed),
                         "prefill_plus_transfer_ms": 1e3 * statistics.median(totals)})
        # raw link speed for the same bytes, nothing else running
        segs = KvSender(p_side, region, staging, adapter.num_layers, 0)
        segs.start_batch([KvSlot("r", target, 0, len(p))])
        from epd.engine.kv_pool import transfer_plan
        from epd.transfer import merge_segments

        e0 = segs.entries[0]
        local, remote, lengths = transfer_plan(e0.staging.layout, layout, table, range(adapter.num_layers))
        local, remote, lengths = merge_segments([o + e0.staging_offset for o in local], remote, lengths)
        t0 = time.perf_counter()
        p_side.write(region, d_region.handle, local, remote, lengths)
        link_s = time.perf_counter() - t0
        segs.abort_batch()
        for r in rows:
            r["link_gb_s"] = r["bytes"] / link_s / 1e9
            r["segments"] = len(lengths)
    return rows


def bench_prefetch(adapter, runner, args) -> dict:
    from PIL import Image
    from skimage import data

    feats, grid = adapter.encode([Image.fromarray(data.astronaut())])[0]
    raw = feats.contiguous().view(-1).view(torch.uint8)
    other = prompts(1, args.prefill_len, adapter.vocab_size, args.seed + 9)[0]
    e, pos, _ = adapter.prompt_inputs(other, [], [])
    with create_backend("mooncake", timeout_s=60) as enc, create_backend("mooncake", timeout_s=60) as pre:
        pool = enc.allocate(raw.numel(), "features")
        pool.tensor[: raw.numel()].copy_(raw)
        local = pre.allocate(raw.numel(), "prefill")
        samples = []
        for _ in range(args.reps):
            t_ready = time.perf_counter()  # FeaturesReady arrives; the request queues behind a batch
            fut = pre.read_async(local, pool.handle, [0], [0], [raw.numel()])
            runner.prefill(e, pos, [len(other)])  # the batch ahead of it
            t_sched = time.perf_counter()  # the request would be scheduled now
            fut.wait()
            t_local = time.perf_counter()
            read_s = fut.elapsed_s
            exposed = max(0.0, t_local - t_sched)
            samples.append((read_s, t_sched - t_ready, exposed))
        assert torch.equal(local.tensor[: raw.numel()], raw)
    read_ms = 1e3 * statistics.median(s[0] for s in samples)
    return {"feature_bytes": raw.numel(), "read_ms": read_ms,
            "queue_wait_ms": 1e3 * statistics.median(s[1] for s in samples),
            "exposed_ms": 1e3 * statistics.median(s[2] for s in samples),
            "hidden_fraction": 1 - statistics.median(s[2] for s in samples) / max(1e-9, read_ms / 1e3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (epd model build --preset mid --out DIR)")
    ap.add_argument("--prompt-len", type=int, default=128, help="decode benchmark prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="decode,prefill,kv,prefetch")
    ap.add_argument("--out", default="benchmarks/results/engine.json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    adapter = Qwen2VLAdapter.load(args.model)
    runner = Qwen2VLRunner(adapter)
    model = adapter.model
    only = set(args.only.split(","))
    result: dict = {"model": args.model, "threads": args.threads, "args": vars(args)}
    if "decode" in only:
        result["decode"] = bench_decode(adapter, runner, model, args)
        print(f"\n{'decode batch':>14}{'ours tok/s':>12}{'HF tok/s':>12}{'ours/HF':>9}")
        for r in result["decode"]:
            print(f"{r['batch']:>14}{r['ours_tok_s']:>12.1f}{r['hf_tok_s']:>12.1f}{r['ratio']:>9.2f}")
    if "prefill" in only:
        r = result["prefill"] = bench_prefill(adapter, runner, model, args)
        print(f"\nprefill {r['tokens']} tokens: ours {r['ours_tok_s']:.0f} tok/s, HF forward {r['hf_tok_s']:.0f} tok/s,"
              f" ours/HF {r['ratio']:.2f}")
    if "kv" in only:
        result["kv_transfer"] = bench_kv_transfer(adapter, runner, args)
        print(f"\n{'KV group G':>11}{'MB':>8}{'segments':>10}{'link GB/s':>11}{'exposed ms':>12}"
              f"{'prefill+xfer ms':>17}")
        for r in result["kv_transfer"]:
            print(f"{r['group']:>11}{r['bytes'] / 1e6:>8.1f}{r['segments']:>10}{r['link_gb_s']:>11.2f}"
                  f"{r['exposed_ms']:>12.2f}{r['prefill_plus_transfer_ms']:>17.1f}")
    if "prefetch" in only:
        r = result["prefetch"] = bench_prefetch(adapter, runner, args)
        print(f"\nfeature prefetch: {r['feature_bytes'] / 1e6:.2f} MB read in {r['read_ms']:.2f} ms while queued "
              f"{r['queue_wait_ms']:.1f} ms; exposed {r['exposed_ms']:.2f} ms "
              f"({100 * r['hidden_fraction']:.0f}% hidden)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
