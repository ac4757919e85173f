"""How closely the serving pipeline follows Hugging Face in bfloat16 (issue 13's agreement measure).

float32 is the exactness bar (every exactness test runs float32). In bfloat16 the pipeline
(encoder forward → packed prefill → paged KV pool → batched decode: :func:`epd.engine.local.run_greedy`)
is compared with HF ``generate(do_sample=False)`` in the same dtype, over a fixed prompt set
(real photographs and text):

- **prefill logits**: max |Δ| between the pipeline's and HF's first-token logits, and that
  divided by the std of HF's logits;
- **greedy agreement**: the share of the first ``--tokens`` generated tokens equal to HF's at
  the same position, and the mean length of the common prefix;
- **batch invariance**: the same prompts served all in one batch vs one at a time — the share
  of requests whose tokens are identical.

Randomly initialised presets are the hard case: their next-token logits are nearly flat, so
one bf16 rounding step flips a greedy choice that a trained checkpoint would hold.

    .venv/bin/python benchmarks/bf16_agreement.py --model ~/.cache/epd-serve/models/mid-seed0 \\
        --out docs/bench/bf16-agreement-mid.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epd.bench.workloads import photo  # noqa: E402
from epd.engine.local import LocalRequest, run_greedy, teacher_forced  # noqa: E402
from epd.models.hf_reference import hf_inputs, hf_processor  # noqa: E402
from epd.models.qwen2_vl import Qwen2VLAdapter  # noqa: E402

#: (images, text): 6 with one or two real photographs, 6 text-only.
PROMPTS = [
    (["astronaut"], "Describe this picture."),
    (["chelsea"], "What animal is this and what is it doing?"),
    (["coffee"], "What is in the cup?"),
    (["rocket"], "Where might this photo have been taken?"),
    (["astronaut", "coffee"], "Compare these two pictures."),
    (["hubble_deep_field", "chelsea"], "Which of these images is brighter?"),
    ([], "Tell me about the market on a rainy day."),
    ([], "Write a short letter to a friend about the garden in spring."),
    ([], "Explain how a bicycle stays upright."),
    ([], "List three uses of copper."),
    ([], "What is the capital of France, and why is it famous?"),
    ([], "Summarise the plot of a detective story in two sentences."),
]
PHOTO_SIZE = 336  # px, square: 144 image tokens on Qwen2-VL geometry (bounded run time)


def reference(model_dir: Path, dtype: torch.dtype, tokens: int):
    """HF ``generate`` greedy tokens and first-token logits per prompt, plus the pipeline requests."""
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    processor = hf_processor(model_dir)
    requests, ref = [], {}
    for i, (names, text) in enumerate(PROMPTS):
        pics = [photo(n).resize((PHOTO_SIZE, PHOTO_SIZE)) for n in names]
        inputs = hf_inputs(processor, pics, text)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=tokens, output_logits=True,
                                 return_dict_in_generate=True)
        prompt = inputs["input_ids"][0].tolist()
        ref[f"p{i}"] = (out.sequences[0, len(prompt):].tolist(), [x[0].float() for x in out.logits])
        requests.append(LocalRequest(f"p{i}", prompt, pics, tokens))
    return requests, ref


def prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def measure(model_dir: Path, dtype_name: str, tokens: int) -> dict:
    """One dtype: agreement with HF and batch invariance (see the module docstring)."""
    dtype = getattr(torch, dtype_name)
    requests, ref = reference(model_dir, dtype, tokens)
    ref32 = reference(model_dir, torch.float32, tokens)[1] if dtype != torch.float32 else ref
    adapter = Qwen2VLAdapter.load(model_dir, dtype=dtype)
    batched = run_greedy(adapter, requests, max_batch=len(requests))
    alone = run_greedy(adapter, requests, max_batch=1)
    rows, equal, equal_alone, equal32, total, prefixes, logit_diff, logit_rel = [], 0, 0, 0, 0, [], [], []
    forced_rel, forced_hits, forced32 = [], [], []
    for r in requests:
        want, want_logits = ref[r.request_id]
        got = batched[r.request_id]
        same = sum(x == y for x, y in zip(got.tokens, want, strict=False))
        equal += same
        equal32 += sum(x == y for x, y in zip(got.tokens, ref32[r.request_id][0], strict=False))
        equal_alone += sum(x == y for x, y in zip(alone[r.request_id].tokens, want, strict=False))
        total += len(want)
        prefixes.append(prefix(got.tokens, want))
        diff = float((got.prefill_logits - want_logits[0]).abs().max())
        logit_diff.append(diff)
        logit_rel.append(diff / float(want_logits[0].std()))
        step_rel, step_hits = teacher_forced(adapter, r, want, want_logits)
        forced_rel.append(step_rel)
        forced_hits.append(step_hits)
        forced32.append(teacher_forced(adapter, r, *ref32[r.request_id])[1])
        rows.append({"request": r.request_id, "images": len(r.images), "prompt_tokens": len(r.prompt_ids),
                     "equal_tokens": same, "common_prefix": prefixes[-1], "max_abs_logit_diff": diff,
                     "teacher_forced_max_logit_diff_over_std": step_rel, "teacher_forced_argmax_agreement": step_hits,
                     "batch_invariant": got.tokens == alone[r.request_id].tokens})
    return {
        "dtype": dtype_name,
        "prompts": len(requests),
        "tokens_per_prompt": tokens,
        "token_agreement": equal / total,
        "token_agreement_alone": equal_alone / total,
        "token_agreement_vs_hf_float32": equal32 / total,
        "mean_common_prefix": sum(prefixes) / len(prefixes),
        "max_abs_prefill_logit_diff": max(logit_diff),
        "max_prefill_logit_diff_over_std": max(logit_rel),
        "teacher_forced_max_logit_diff_over_std": max(forced_rel),
        "teacher_forced_argmax_agreement": sum(forced_hits) / len(forced_hits),
        "teacher_forced_argmax_agreement_vs_hf_float32": sum(forced32) / len(forced32),
        "batch_invariant_share": sum(row["batch_invariant"] for row in rows) / len(rows),
        "rows": rows,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="model directory (e.g. the mid preset)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated dtypes to measure")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens compared per prompt")
    p.add_argument("--threads", type=int, default=int(os.environ.get("EPD_TORCH_THREADS", "0")) or None)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    results = {"model": str(args.model), "threads": torch.get_num_threads(),
               "runs": [measure(args.model.expanduser(), d, args.tokens) for d in args.dtypes.split(",")]}
    print(f"{'dtype':<10} {'prompts':>7} {'token agreement':>16} {'(one at a time)':>16} {'vs HF fp32':>11} "
          f"{'mean prefix':>12} {'max |Δlogit|':>13} {'Δ/std':>7} {'forced Δ/std':>12} {'forced argmax':>13} "
          f"{'(vs fp32)':>9} {'batch-invariant':>16}")
    for r in results["runs"]:
        print(f"{r['dtype']:<10} {r['prompts']:>7} {r['token_agreement']:>15.1%} {r['token_agreement_alone']:>15.1%} "
              f"{r['token_agreement_vs_hf_float32']:>10.1%} "
              f"{r['mean_common_prefix']:>9.1f}/{r['tokens_per_prompt']:<2} {r['max_abs_prefill_logit_diff']:>13.4f} "
              f"{r['max_prefill_logit_diff_over_std']:>7.4f} {r['teacher_forced_max_logit_diff_over_std']:>12.4f} "
              f"{r['teacher_forced_argmax_agreement']:>12.1%} "
              f"{r['teacher_forced_argmax_agreement_vs_hf_float32']:>9.1%} {r['batch_invariant_share']:>15.0%}")
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
