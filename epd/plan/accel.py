"""A profile for a 7–8B vision-language model on one accelerator, derived by documented factors.

No accelerator is available here, so the per-stage costs are the roofline of each stage on the
device's datasheet figures, times an achieved-utilisation factor, with the model's published
shapes. Every number below names its source; change them with ``--set key=value``.

Model — Qwen2-VL-7B (Qwen2-VL, arXiv 2409.12191, Table 1: ViT 675 M + LLM 7.6 B parameters;
HF ``Qwen/Qwen2-VL-7B-Instruct`` config.json: 28 layers, hidden 3584, 28 heads, 4 KV heads,
head_dim 128; vision depth 32, embed_dim 1280; patch 14, merge 2, max_pixels 28·28·1280).

Device — NVIDIA A100 80 GB SXM datasheet: 312 TFLOP/s dense BF16, 2,039 GB/s HBM2e, 80 GB
(EPD Disaggregation ran on A100s; EPD-Serve on Ascend 910B, within ~10 % on both figures).

Costs (seconds, the :mod:`epd.plan.profile` features):

- encode: ``2·675e6`` FLOPs per patch (linear layers) + ``4·depth·embed_dim·p²`` per image
  (attention) at ``MFU_ENCODE`` of peak; the image processor on the host CPU at
  ``PREPROCESS_S_PER_MPIXEL`` (taken from the measured cpu profile when one is given: its
  1-thread ``encode.src_mpixels``); a fixed ``ENCODE_BASE_S`` per forward (launches, copies).
- prefill: ``2·7.6e9`` FLOPs per token + ``4·layers·hidden·n²`` per prompt at ``MFU_PREFILL``;
  ``PREFILL_BASE_S`` per forward.
- decode: a step reads every weight once — ``15.2 GB / (bandwidth · BW_EFF)`` — plus each
  request's KV (``2·28·4·128·2 = 57,344`` bytes per token) and ``2·7.6e9`` FLOPs per request.
- transfer: RDMA at ``LINK_GB_S`` (a 200 Gb/s NIC at ~80 %), ``LINK_BASE_S`` per call.
- host (gateway, detokenizer): the measured cpu profile's figures (the gateway runs on a host
  CPU like this one); jpeg decode also from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from epd.plan.profile import SCHEMA, Profile

PARAMS = {
    "PEAK_FLOPS": 312e12,  # A100 BF16 dense (datasheet)
    "HBM_BYTES_S": 2.039e12,  # A100 80GB SXM (datasheet)
    "MEMORY_BYTES": 80e9,
    "MFU_ENCODE": 0.35,  # ViT at 1–4k patches per image: smaller GEMMs than prefill
    "MFU_PREFILL": 0.50,  # 7B prefill of 0.5–8k tokens (typical vLLM/Megatron figures)
    "BW_EFF": 0.70,  # decode's achieved fraction of HBM bandwidth
    "ENCODE_BASE_S": 0.004,
    "ENCODE_PER_IMAGE_S": 0.001,
    "PREPROCESS_S_PER_MPIXEL": 0.010,
    "PREFILL_BASE_S": 0.004,
    "PREFILL_PER_REQUEST_S": 0.0005,
    "DECODE_BASE_EXTRA_S": 0.001,  # sampling, scheduling, launches per step
    "DECODE_PER_REQUEST_EXTRA_S": 0.00005,
    "LINK_GB_S": 20.0,
    "LINK_BASE_S": 30e-6,
    "JPEG_S_PER_MPIXEL": 0.008,
    "COLOCATION_EFFICIENCY": 1.0,  # what-if: < 1 slows co-located roles while both run (epd/plan/shared.py)
}

QWEN2_VL_7B = {
    "name": "Qwen2-VL-7B (shapes)", "path": "", "num_layers": 28, "hidden_size": 3584, "num_kv_heads": 4,
    "head_dim": 128, "vision_hidden": 1280,
    "geometry": {"patch_size": 14, "merge_size": 2, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280},
    "template_tokens": 20, "image_wrap_tokens": 2,
    "weights_bytes": {"vision": int(675e6 * 2), "language": int(7.6e9 * 2)},
    "vision_params": 675e6, "language_params": 7.6e9, "vision_depth": 32, "vision_attn_window": 0,
}

#: MiniCPM-V 2.6 (one of the EPD paper's models; arXiv 2408.01800): SigLIP-400M (27 layers, width
#: 1152) on 448² slices of 1024 patches, each compressed to 64 tokens by the resampler, up to 9
#: slices per image; LLM Qwen2-7B. In Qwen2-VL's geometry that is merge_size 4 (16 patches per
#: token) and attention within a 1024-patch window (linear in patches per image).
MINICPM_V_26 = {
    **QWEN2_VL_7B, "name": "MiniCPM-V-2.6 (shapes)", "vision_hidden": 1152,
    "geometry": {"patch_size": 14, "merge_size": 4, "min_pixels": 448 * 448, "max_pixels": 9 * 448 * 448},
    "weights_bytes": {"vision": int(400e6 * 2), "language": int(7.6e9 * 2)},
    "vision_params": 400e6, "vision_depth": 27, "vision_attn_window": 1024,
}

MODELS = {"qwen2-vl-7b": QWEN2_VL_7B, "minicpm-v-2.6": MINICPM_V_26}


def accelerator_profile(base: Profile | None = None, model: str = "qwen2-vl-7b", **overrides: float) -> Profile:
    """The Qwen2-VL-7B-on-A100 profile (see the module docstring); ``base`` (a measured cpu
    profile) supplies the host costs, the image-processor and JPEG-decode rates and, when it was
    built from a model directory, that model's tokenizer for prompt lengths."""
    p = {**PARAMS, **overrides}
    m = dict(MODELS[model])
    if base is not None:
        t1 = min(base.threads)
        p["PREPROCESS_S_PER_MPIXEL"] = overrides.get("PREPROCESS_S_PER_MPIXEL",
                                                     base.stages["encode"][t1].coef["src_mpixels"] or
                                                     p["PREPROCESS_S_PER_MPIXEL"])
        p["JPEG_S_PER_MPIXEL"] = overrides.get("JPEG_S_PER_MPIXEL",
                                               base.stages["image_decode"][t1].coef["src_mpixels"] or
                                               p["JPEG_S_PER_MPIXEL"])
        m["path"] = base.model.get("path", "")
    enc_flops = p["PEAK_FLOPS"] * p["MFU_ENCODE"]
    pre_flops = p["PEAK_FLOPS"] * p["MFU_PREFILL"]
    bw = p["HBM_BYTES_S"] * p["BW_EFF"]
    kv_token = 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * 2
    attn = 4 * m["vision_depth"] * m["vision_hidden"]  # FLOPs per (query patch × key patch)
    window = m["vision_attn_window"]  # 0: full attention over the image (quadratic in its patches)
    encode = {"base": p["ENCODE_BASE_S"], "images": p["ENCODE_PER_IMAGE_S"],
              "patches": (2 * m["vision_params"] + attn * window) / enc_flops,
              "patches_sq": 0.0 if window else attn * 1e6 / enc_flops,
              "src_mpixels": p["PREPROCESS_S_PER_MPIXEL"]}
    image_decode = {"base": 0.0002, "src_mpixels": p["JPEG_S_PER_MPIXEL"]}
    prefill = {"base": p["PREFILL_BASE_S"], "requests": p["PREFILL_PER_REQUEST_S"],
               "tokens": 2 * m["language_params"] / pre_flops,
               "tokens_sq": 4 * m["num_layers"] * m["hidden_size"] * 1e6 / pre_flops, "images": 0.0005}
    decode = {"base": m["weights_bytes"]["language"] / bw + p["DECODE_BASE_EXTRA_S"],
              "batch": 2 * m["language_params"] / pre_flops + p["DECODE_PER_REQUEST_EXTRA_S"],
              "batch_ctx": kv_token * 1e3 / bw}
    transfer = {"base": p["LINK_BASE_S"], "mbytes": 1e6 / (p["LINK_GB_S"] * 1e9)}
    host = dict(base.host) if base is not None else {"request_s": 0.0005, "request_mbyte_s": 0.004,
                                                     "token_s": 0.00015, "hop_s": 0.0001,
                                                     "jpeg_bytes_per_pixel": 0.3}
    raw = {
        "schema": SCHEMA, "created": "", "seed": 0,
        "device": {"kind": "accelerator", "name": "A100-80GB (datasheet roofline)", "cores": 1,
                   "memory_bytes": p["MEMORY_BYTES"], "host_cores": 32,
                   "encoder_activation_bytes": 4e9, "prefill_activation_bytes": 8e9,
                   "colocation_efficiency": p["COLOCATION_EFFICIENCY"]},
        "model": m, "dtype": "bfloat16", "dtype_bytes": 2, "threads": [1], "transfer_backend": "mooncake-rdma",
        "stages": {"encode": {"1": {"coef": encode}}, "image_decode": {"1": {"coef": image_decode}},
                   "prefill": {"1": {"coef": prefill}}, "decode": {"1": {"coef": decode}}},
        "transfer": {"coef": transfer}, "host": host,
        "scale": {"source": f"roofline of {m['name']} on A100-80GB datasheet figures × utilisation "
                            "(epd/plan/accel.py)",
                  "factors": p, "note": "host costs from " + (base.path if base is not None else "defaults")},
    }
    prof = Profile.from_json(raw, "accelerator profile")
    prof.path = "accelerator profile"
    return prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="a measured cpu profile (host costs, preprocessing rate)")
    ap.add_argument("--model", default="qwen2-vl-7b", choices=sorted(MODELS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=f"override: {', '.join(PARAMS)}")
    args = ap.parse_args()
    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in PARAMS:
            raise SystemExit(f"unknown --set key {k!r} (expected one of {', '.join(PARAMS)})")
        overrides[k] = float(v)
    prof = accelerator_profile(Profile.load(args.base) if args.base else None, args.model, **overrides)
    out = prof.save(args.out)
    print(json.dumps({s: {str(t): m.coef for t, m in per.items()} for s, per in prof.stages.items()}, indent=1))
    print(f"wrote {Path(out)}")


if __name__ == "__main__":
    main()

