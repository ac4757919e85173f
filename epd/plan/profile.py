"""The profile JSON: per-stage cost models of one device, model and dtype (``epd profile``).

A profile says how long each unit of work takes when it runs alone on the device with a given
number of host threads; the simulator (:mod:`epd.plan.sim`) adds queueing, batching and the
slow-down of roles that share a device. Every cost model is linear in a few *features* of the
work, with non-negative coefficients fitted to measured samples (relative least squares):

=============== =========================================================== =====================
model           features (seconds per unit)                                 measured with
=============== =========================================================== =====================
``encode``      base, images, patches (Σ p_i), patches_sq (Σ p_i²),         ``Qwen2VLAdapter.encode``
                src_mpixels (Σ source megapixels: the image processor)      (processor + ViT + merger)
``image_decode`` base, src_mpixels                                          PIL decode of the JPEG
``prefill``     base, requests, tokens (Σ n_i), tokens_sq (Σ n_i², M-tokens²), ``prompt_inputs`` +
                images (feature scatter + M-RoPE positions per image)       ``Qwen2VLRunner.prefill``
``decode``      base, multi (1 if B ≥ 2), batch, batch_ctx (B · longest       one continuous-batching step
                context, k-tokens)
``transfer``    base, mbytes                                                one-sided write of N bytes
=============== =========================================================== =====================

``patches_sq`` and ``tokens_sq`` carry attention's quadratic cost (per image in the ViT, per
prompt in packed prefill); ``batch_ctx`` the decode step's KV gather, which pads every row to
the longest context in the batch (``Qwen2VLRunner.decode``); ``multi`` the step from one row to
a batch: in float32 a lone request's linear layers run as matrix-vector products and a batch's
as GEMMs, another kernel (mid, float32, a 2-vCPU AVX2 EPYC, context 64: 38.6 ms at batch 1,
65.6 ms at 4, 90.2 ms at 16). In bf16 a lone request already runs as two rows and ``multi`` fits
near 0. A profile written before ``multi`` existed loads with it at 0; ``--refit`` fits it.

Schema (``"schema": "epd-profile/1"``)::

    {"schema", "created", "seed", "device": {"kind": "cpu"|"accelerator", "name", "cores",
     "memory_bytes", "parallel_capacity" (cpu: {k: solo-work per second with k busy one-thread processes}),
     "parallel_efficiency" (cpu: effective cores ÷ cores for busy one-thread
     processes, epd.plan.parallel), "colocation_efficiency" (accelerator what-if)},
     "model": {"name", "path", "num_layers", "hidden_size", "num_kv_heads", "head_dim",
     "vision_hidden", "geometry": {patch_size, merge_size, min_pixels, max_pixels},
     "template_tokens", "image_wrap_tokens", "weights_bytes": {"vision", "language"}},
     "dtype", "dtype_bytes", "threads": [1, 2], "transfer_backend",
     "stages": {"encode"|"image_decode"|"prefill"|"decode": {"<threads>": {"coef": {feature:
     s}, "samples": [{"x": {feature: v}, "s": seconds}], "median_rel_err"}}},
     "transfer": {"coef", "samples", "median_rel_err"},
     "host": {"request_s", "request_mbyte_s", "token_s", "hop_s", "jpeg_bytes_per_pixel",
     optional "gateway" and "client": {"request_s", "request_mbyte_s", "delivery_s", "token_s"}
     (measured on a running deployment, epd.plan.frontend; without them the first three keys are
     the gateway's costs and the client costs nothing), optional "service": {SERVICE_KEYS} (what
     the services spend beyond the engine's forwards, epd.plan.frontend.service_overheads)},
     "scale": null | {"source", "factors", "note"}}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from epd.plan.hostcosts import front, host_parts, overhead_s

SCHEMA = "epd-profile/1"

#: Feature names of each cost model, in fitting order.
FEATURES: dict[str, tuple[str, ...]] = {
    "encode": ("base", "images", "patches", "patches_sq", "src_mpixels"),
    "image_decode": ("base", "src_mpixels"),
    "prefill": ("base", "requests", "tokens", "tokens_sq", "images"),
    "decode": ("base", "multi", "batch", "batch_ctx"),
    "transfer": ("base", "mbytes"),
}
STAGES = ("encode", "image_decode", "prefill", "decode")
HOST_KEYS = ("request_s", "request_mbyte_s", "token_s", "hop_s", "jpeg_bytes_per_pixel")


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


# -- features of a unit of work ----------------------------------------------------------
def encode_x(images: list[tuple[int, float]]) -> dict[str, float]:
    """Features of one vision forward over ``images``: ``(patches, source pixels)`` each."""
    return {"base": 1.0, "images": float(len(images)), "patches": float(sum(p for p, _ in images)),
            "patches_sq": float(sum(p * p for p, _ in images)) / 1e6,
            "src_mpixels": float(sum(s for _, s in images)) / 1e6}


def image_decode_x(src_pixels: float) -> dict[str, float]:
    """Features of decoding one JPEG of ``src_pixels`` pixels."""
    return {"base": 1.0, "src_mpixels": src_pixels / 1e6}


def prefill_x(seq_lens: list[int], images: int = 0) -> dict[str, float]:
    """Features of one packed prefill of prompts of ``seq_lens`` tokens holding ``images`` images in all
    (each image adds its feature scatter and M-RoPE position work in ``prompt_inputs``)."""
    return {"base": 1.0, "requests": float(len(seq_lens)), "tokens": float(sum(seq_lens)),
            "tokens_sq": float(sum(n * n for n in seq_lens)) / 1e6, "images": float(images)}


def decode_x(batch: int, max_ctx: int) -> dict[str, float]:
    """Features of one decode step of ``batch`` requests whose longest context is ``max_ctx`` tokens
    (``multi``: 1 for a batch of two or more, see the module docstring)."""
    return {"base": 1.0, "multi": 1.0 if batch >= 2 else 0.0, "batch": float(batch),
            "batch_ctx": batch * max_ctx / 1e3}


def transfer_x(nbytes: float) -> dict[str, float]:
    """Features of one one-sided transfer of ``nbytes`` bytes."""
    return {"base": 1.0, "mbytes": nbytes / 1e6}


# -- fitting -----------------------------------------------------------------------------
def fit(features: tuple[str, ...], samples: list[dict]) -> tuple[dict[str, float], float]:
    """Non-negative coefficients minimising the *relative* squared error over ``samples``.

    Args:
        features: the model's feature names.
        samples: ``[{"x": {feature: value}, "s": seconds}, ...]`` (``s > 0``).

    Returns:
        ``(coef, median relative error)``: non-negative least squares (Lawson–Hanson,
        ``scipy.optimize.nnls``) on the rows weighted by ``1 / seconds``.

    Raises:
        ValueError: no samples.
    """
    from scipy.optimize import nnls

    if not samples:
        raise ValueError("no samples to fit")
    x = np.array([[s["x"].get(f, 0.0) for f in features] for s in samples], dtype=np.float64)
    y = np.array([s["s"] for s in samples], dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-9)
    coef, _ = nnls(x * w[:, None], y * w)
    rel = float(np.median(np.abs(x @ coef - y) / y))
    return {f: float(c) for f, c in zip(features, coef, strict=True)}, rel


@dataclass
class CostModel:
    """``seconds = Σ coef[f] · x[f]`` (at least 1 µs)."""

    coef: dict[str, float]
    median_rel_err: float = 0.0
    samples: list[dict] = field(default_factory=list)

    def __call__(self, x: dict[str, float]) -> float:
        return max(1e-6, sum(c * x.get(f, 0.0) for f, c in self.coef.items()))

    def to_json(self) -> dict:
        return {"coef": self.coef, "median_rel_err": self.median_rel_err, "samples": self.samples}

    @classmethod
    def fitted(cls, stage: str, samples: list[dict]) -> CostModel:
        if stage == "decode":  # samples stored before ``multi`` existed: it follows from their batch
            samples = [{**s, "x": {"multi": float(s["x"]["batch"] >= 2), **s["x"]}} for s in samples]
        coef, err = fit(FEATURES[stage], samples)
        return cls(coef, err, samples)


@dataclass
class Profile:
    """A loaded profile (see the module docstring for the file layout).

    Attributes:
        stages: stage → thread count → :class:`CostModel`.
        transfer: the configured backend's transfer model.
        host: per-request and per-token front-end costs and the control-message hop (seconds).
    """

    device: dict
    model: dict
    dtype: str
    dtype_bytes: int
    threads: list[int]
    transfer_backend: str
    stages: dict[str, dict[int, CostModel]]
    transfer: CostModel
    host: dict  # HOST_KEYS → seconds; optional FRONT_ENDS → {FRONT_KEYS → seconds}
    seed: int = 0
    created: str = ""
    scale: dict | None = None
    path: str = ""

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over every layer."""
        m = self.model
        return 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * self.dtype_bytes

    def feature_bytes(self, tokens: int) -> int:
        """Bytes of one image's features ``[tokens, hidden]``."""
        return tokens * self.model["hidden_size"] * self.dtype_bytes

    def image_tokens(self, width: int, height: int) -> tuple[int, int]:
        """``(LLM tokens, ViT patches)`` of an image of ``width × height`` pixels (Qwen2-VL smart_resize)."""
        from epd.models.geometry import ImageGeometry

        g = self.model["geometry"]
        geo = ImageGeometry(patch_size=g["patch_size"], merge_size=g["merge_size"],
                            min_pixels=g["min_pixels"], max_pixels=g["max_pixels"])
        tokens, (t, h, w) = geo.num_image_tokens(width, height)
        return tokens, t * h * w

    # -- costs -----------------------------------------------------------------------------
    def nearest_threads(self, threads: int) -> int:
        """The profiled thread count used for a process with ``threads`` threads: the largest
        profiled count ≤ ``threads``, else the smallest profiled."""
        below = [t for t in self.threads if t <= threads]
        return max(below) if below else min(self.threads)

    def cost(self, stage: str, threads: int, x: dict[str, float]) -> float:
        """Seconds of one unit of ``stage`` work with features ``x`` alone on the device.

        A process with more threads than any profiled count is charged the largest count's
        time scaled by the ratio of threads (the profile cannot say more; ``epd profile``
        measures up to the machine's cores).
        """
        t = self.nearest_threads(threads)
        base = self.stages[stage][t](x)
        if threads > max(self.threads) and self.device.get("kind") == "cpu":
            base *= max(self.threads) / threads
        return base

    def front(self, who: str) -> dict[str, float]:
        """CPU seconds of ``who`` (``gateway`` | ``client``) per request, MB, delivery and token
        (:func:`epd.plan.hostcosts.front`)."""
        return front(self.host, who)

    def overhead_s(self, stage: str, n: int) -> float:
        """Seconds a service spends beyond :meth:`cost`'s forward on one ``stage`` step of ``n``
        items (:func:`epd.plan.hostcosts.overhead_s`)."""
        return overhead_s(self.host, stage, n)

    def transfer_s(self, nbytes: float) -> float:
        """Seconds of one transfer of ``nbytes`` on the profiled backend."""
        return self.transfer(transfer_x(nbytes)) if nbytes > 0 else 0.0

    # -- I/O -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "schema": SCHEMA, "created": self.created, "seed": self.seed, "device": self.device,
            "model": self.model, "dtype": self.dtype, "dtype_bytes": self.dtype_bytes, "threads": self.threads,
            "transfer_backend": self.transfer_backend,
            "stages": {s: {str(t): m.to_json() for t, m in per.items()} for s, per in self.stages.items()},
            "transfer": self.transfer.to_json(), "host": self.host, "scale": self.scale,
        }

    def refitted(self) -> Profile:
        """A copy with every stage's and the transfer's cost model fitted again from the samples
        it stores (a profile measured with an older fit; scaled profiles keep no samples and
        keep their coefficients).
        """
        def again(stage: str, m: CostModel) -> CostModel:
            return CostModel.fitted(stage, m.samples) if m.samples else m

        stages = {s: {t: again(s, m) for t, m in per.items()} for s, per in self.stages.items()}
        return replace(self, stages=stages, transfer=again("transfer", self.transfer))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def from_json(cls, raw: object, where: str = "profile") -> Profile:
        """Validate and build.

        Raises:
            ProfileError: wrong schema, a missing or ill-typed field, a stage without a model
                for some profiled thread count, a negative or non-finite coefficient.
        """
        def need(obj, key, kind, ctx):
            if not isinstance(obj, dict) or key not in obj:
                raise ProfileError(f"{where}: missing field {ctx}{key}")
            val = obj[key]
            if not isinstance(val, kind) or isinstance(val, bool) and kind is not bool:
                raise ProfileError(f"{where}: field {ctx}{key} must be {getattr(kind, '__name__', kind)}")
            return val

        if not isinstance(raw, dict):
            raise ProfileError(f"{where}: not a JSON object")
        if raw.get("schema") != SCHEMA:
            raise ProfileError(f"{where}: schema {raw.get('schema')!r}, expected {SCHEMA!r} "
                               "(write it with epd profile)")
        device = need(raw, "device", dict, "")
        need(device, "kind", str, "device.")
        need(device, "cores", int, "device.")
        model = need(raw, "model", dict, "")
        for key in ("num_layers", "hidden_size", "num_kv_heads", "head_dim", "template_tokens", "image_wrap_tokens"):
            need(model, key, int, "model.")
        geo = need(model, "geometry", dict, "model.")
        for key in ("patch_size", "merge_size", "min_pixels", "max_pixels"):
            need(geo, key, int, "model.geometry.")
        threads = need(raw, "threads", list, "")
        if not threads or not all(isinstance(t, int) and t > 0 for t in threads):
            raise ProfileError(f"{where}: field threads must be a non-empty list of positive integers")
        stages_raw = need(raw, "stages", dict, "")
        stages: dict[str, dict[int, CostModel]] = {}
        for stage in STAGES:
            per = need(stages_raw, stage, dict, "stages.")
            stages[stage] = {}
            for t in threads:
                entry = need(per, str(t), dict, f"stages.{stage}.")
                stages[stage][t] = _model(entry, stage, f"stages.{stage}.{t}", where)
        transfer = _model(need(raw, "transfer", dict, ""), "transfer", "transfer", where)
        host = need(raw, "host", dict, "")
        for key in HOST_KEYS:
            val = need(host, key, (int, float), "host.")
            if not math.isfinite(val) or val < 0:
                raise ProfileError(f"{where}: field host.{key} must be a finite number ≥ 0")
        fronts = host_parts(host, need, where, ProfileError)
        dtype_bytes = need(raw, "dtype_bytes", int, "")
        return cls(device=device, model=model, dtype=need(raw, "dtype", str, ""), dtype_bytes=dtype_bytes,
                   threads=sorted(threads), transfer_backend=str(raw.get("transfer_backend", "")), stages=stages,
                   transfer=transfer, host={**{k: float(host[k]) for k in HOST_KEYS}, **fronts},
                   seed=int(raw.get("seed", 0)), created=str(raw.get("created", "")), scale=raw.get("scale"),
                   path=where)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read and validate a profile file.

        Raises:
            ProfileError: unreadable, not JSON, or invalid (see :meth:`from_json`).
        """
        try:
            raw = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ProfileError(f"{path}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_json(raw, str(path))

    # -- scaling ---------------------------------------------------------------------------
    def scaled(self, factors: dict[str, float], source: str, note: str = "", **overrides) -> Profile:
        """A copy whose stage costs are multiplied by ``factors`` (stage → factor; ``transfer``,
        ``host`` allowed) — e.g. to move a measured profile onto an accelerator.

        ``overrides`` replace top-level fields (``device``, ``model``, ``dtype``, ``threads``, ...).
        """
        def mul(m: CostModel, f: float) -> CostModel:
            return CostModel({k: v * f for k, v in m.coef.items()}, m.median_rel_err, [])

        stages = {s: {t: mul(m, factors.get(s, 1.0)) for t, m in per.items()} for s, per in self.stages.items()}
        hf = factors.get("host", 1.0)
        host = {k: ({kk: vv * hf for kk, vv in v.items()} if isinstance(v, dict) else
                    v * hf if k.endswith("_s") else v) for k, v in self.host.items()}
        fields = dict(device=self.device, model=self.model, dtype=self.dtype, dtype_bytes=self.dtype_bytes,
                      threads=self.threads, transfer_backend=self.transfer_backend, stages=stages,
                      transfer=mul(self.transfer, factors.get("transfer", 1.0)), host=host, seed=self.seed,
                      created=self.created, scale={"source": source, "factors": factors, "note": note})
        return Profile(**{**fields, **overrides})


def _model(entry: dict, stage: str, ctx: str, where: str) -> CostModel:
    coef = entry.get("coef")
    if not isinstance(coef, dict):
        raise ProfileError(f"{where}: missing field {ctx}.coef")
    coef = {"multi": 0.0, **coef} if stage == "decode" else coef  # a profile from before ``multi``
    for f in FEATURES[stage]:
        v = coef.get(f)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ProfileError(f"{where}: field {ctx}.coef.{f} must be a finite number ≥ 0")
    return CostModel({f: float(coef[f]) for f in FEATURES[stage]}, float(entry.get("median_rel_err", 0.0)),
                     list(entry.get("samples", [])))


def check_target(prof: Profile, model_dir: str | Path | None = None, device: str | None = None) -> None:
    """Refuse to plan ``model_dir`` on ``device`` with a profile measured for something else.

    ``model_dir`` (an HF checkpoint directory) must have the profile's shapes — language layers,
    hidden size, KV heads and vision width, from its ``config.json``; ``device`` must name the
    profile's device kind (``cpu``, ``accelerator``) or occur in its name (``EPYC``, ``A100``).

    Raises:
        ProfileError: naming both the profile's model or device and the one asked for.
    """
    if model_dir is not None:
        path = Path(model_dir).expanduser()
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ProfileError(f"--model {model_dir}: not a model directory ({exc})") from None
        text, vision = cfg.get("text_config", cfg), cfg.get("vision_config", {})
        want = {"num_layers": text.get("num_hidden_layers"), "hidden_size": text.get("hidden_size"),
                "num_kv_heads": text.get("num_key_value_heads"),
                "vision_hidden": vision.get("embed_dim", vision.get("hidden_size"))}
        have = {k: prof.model.get(k) for k in want}
        diff = [k for k, v in want.items() if v is not None and have[k] is not None and int(v) != int(have[k])]
        if diff:
            shapes = ", ".join(f"{k} {have[k]} vs {want[k]}" for k in diff)
            raise ProfileError(f"{prof.path} was measured on model {prof.model.get('name', '?')} "
                               f"({prof.model.get('path', '')}), not on {path.name} ({path}): {shapes}")
    if device:
        kind, name = str(prof.device.get("kind", "")), str(prof.device.get("name", ""))
        if device.lower() != kind.lower() and device.lower() not in name.lower():
            raise ProfileError(f"{prof.path} was measured on {name} ({kind}), not on {device!r}: "
                               "profile the target device with epd profile there")
