"""``epd profile``: measure each stage on this device and model, fit the cost models, write the
profile JSON (:mod:`epd.plan.profile`).

Everything runs in this process with the serving engine's own parts, one unit of work at a
time, on ``torch.set_num_threads(t)`` for each profiled thread count ``t``:

- **encode** — :meth:`Qwen2VLAdapter.encode` (image processor + vision tower + merger) on
  batches of 1–4 seeded photographs of several sizes (``patches`` per image from Qwen2-VL's
  ``smart_resize``), and **image_decode** — the PIL decode of each JPEG (the encoder does it
  in its loop when a request arrives);
- **prefill** — :meth:`Qwen2VLRunner.prefill` of single and packed prompts of 16–2048 tokens
  (seeded ids);
- **decode** — one continuous-batching step as ``DecodeEngine.step`` runs it (the block
  scheduler, the block tables, :meth:`Qwen2VLRunner.decode` over a :class:`KvPool`, a sampler
  per request) at batch 1–64 and contexts of 64–1024 tokens;
- **transfer** — one-sided writes of 4 KB–32 MB between two regions of the configured backend
  (:func:`epd.transfer.create_backend`; features and KV move the same way);
- **host** — the control-message hop (protobuf envelope over a ZeroMQ PUSH/PULL pair on
  loopback) and the front end's per-request cost (chat template + tokenization, base64 + sha256
  of the images) and per-token cost (a TokenDelta through the hop, incremental detokenization,
  an SSE chunk built and parsed);
- **front end** — the gateway's and the benchmark client's CPU per request, per MB of image,
  per delivery and per token, read from a running ``epd up --topology E-P-D`` of the model
  (:mod:`epd.plan.frontend`; needs ``redis-server``, as ``epd up`` does; ``front_end=False``
  skips it and the simulator falls back on the synthetic host figures);
- **parallel efficiency** — the engine's work in ``cores`` one-thread processes at once vs one
  alone, and what each stage loses beside another in a second process
  (:mod:`epd.plan.parallel`, :mod:`epd.plan.slowdown`): how many effective cores the simulator
  shares, and the pairwise slowdowns it applies; the encoder's factor beside the decode is then
  taken from the deployment probe instead (the served loops' logged forwards,
  :func:`epd.plan.calibrate.apply_probe`).

Each sample is the median of ``--reps`` runs after one warm-up. The same ``--seed`` gives the
same inputs (images, token ids); times of course vary with the machine's state, so profile an
otherwise idle machine. The model-free measurements (transfer, host) and the sample photographs
are :mod:`epd.plan.probes`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from epd.plan.probes import ENCODE_SIZES, cpu_name, measure_host, measure_transfer, sample_images, timed
from epd.plan.profile import (
    CostModel,
    Profile,
    decode_x,
    encode_x,
    image_decode_x,
    prefill_x,
)

ENCODE_BATCHES = ((1, (448, 448)), (2, (448, 448)), (4, (448, 448)), (2, (802, 652)), (4, (224, 224)))
PREFILL_SINGLE = (16, 64, 256, 600, 1024, 2048)
PREFILL_PACKED = ((4, 64), (4, 256), (8, 128), (2, 600))
PREFILL_IMAGES = (1, 2, 4)  # images (448²) in one prompt
DECODE_BATCH = (1, 4, 16, 64)
DECODE_CTX = (64, 512, 1024)
DECODE_MAX_TOKENS = 32768  # batch × context cap (KV pool size of the measurement)


class Profiler:
    """Measures one model on this machine.

    Args:
        model_dir: HF model directory.
        dtype: ``auto`` or a dtype name (``EPD_DTYPE``'s values).
        threads: thread counts to profile (each stage is measured at each).
        backend: transfer backend (``mooncake`` or ``shm``).
        seed: seeds images and token ids.
        reps: timed runs per sample (median).
        quick: fewer samples (tests).
    """

    def __init__(self, model_dir: Path, dtype: str, threads: list[int], backend: str, seed: int = 0,
                 reps: int = 3, quick: bool = False, front_end: bool = True) -> None:
        from epd.hardware import resolve_dtype

        self.model_dir = Path(model_dir)
        self.dtype, self.dtype_why = resolve_dtype(dtype, "cpu")
        self.threads = sorted(set(threads))
        self.backend = backend
        self.seed = seed
        self.reps = reps
        self.quick = quick
        self.front_end = front_end
        self.samples: dict[str, dict[int, list[dict]]] = {s: {t: [] for t in self.threads}
                                                          for s in ("encode", "image_decode", "prefill", "decode")}
        self.transfer_samples: list[dict] = []
        self.host: dict[str, float] = {}

    # -- plan of the measurements ---------------------------------------------------------
    def tasks(self) -> list[tuple[str, Callable[[], None]]]:
        """``(label, run)`` for every measurement, in order (the progress bar's steps)."""
        enc_sizes = ENCODE_SIZES[:2] if self.quick else ENCODE_SIZES
        enc_batches = ENCODE_BATCHES[:1] if self.quick else ENCODE_BATCHES
        pre_single = PREFILL_SINGLE[:3] if self.quick else PREFILL_SINGLE
        pre_packed = PREFILL_PACKED[:1] if self.quick else PREFILL_PACKED
        dec_batch = DECODE_BATCH[:2] if self.quick else DECODE_BATCH
        dec_ctx = DECODE_CTX[:2] if self.quick else DECODE_CTX
        out: list[tuple[str, Callable[[], None]]] = [("load model", self._load)]
        for t in self.threads:
            for size in enc_sizes:
                out.append((f"encode 1×{size[0]}x{size[1]} t{t}", lambda t=t, s=size: self._encode(t, [s])))
                out.append((f"jpeg decode {size[0]}x{size[1]} t{t}", lambda t=t, s=size: self._jpeg(t, s)))
            for n, size in enc_batches:
                if n > 1:
                    out.append((f"encode {n}×{size[0]}x{size[1]} t{t}",
                                lambda t=t, s=size, n=n: self._encode(t, [s] * n)))
            for n in pre_single:
                out.append((f"prefill {n} t{t}", lambda t=t, n=n: self._prefill(t, [n])))
            for k, n in pre_packed:
                out.append((f"prefill {k}×{n} t{t}", lambda t=t, k=k, n=n: self._prefill(t, [n] * k)))
            for k in PREFILL_IMAGES[:1] if self.quick else PREFILL_IMAGES:
                out.append((f"prefill {k} img t{t}", lambda t=t, k=k: self._prefill(t, [24], images=k)))
            for b in dec_batch:
                for c in dec_ctx:
                    if b * c <= DECODE_MAX_TOKENS:
                        out.append((f"decode b{b} ctx{c} t{t}", lambda t=t, b=b, c=c: self._decode(t, b, c)))
        out.append((f"transfer ({self.backend})", self._transfer))
        out.append(("host overheads", self._host))
        if self.front_end:
            out.append(("front end (epd up E-P-D)", self._front_end))
        out.append(("parallel efficiency", self._parallel))
        return out

    def run(self, progress: bool = True) -> Profile:
        """Measure everything (with a tqdm bar when ``progress``) and return the fitted profile."""
        import torch

        torch.manual_seed(self.seed)
        steps = self.tasks()
        bar = None
        if progress:
            try:
                from tqdm import tqdm
            except ImportError:  # the [bench] extra brings it; without it, no bar
                tqdm = None
            if tqdm is not None:
                bar = tqdm(total=len(steps), desc="epd profile", unit="step", dynamic_ncols=True)
        saved = torch.get_num_threads()
        try:
            for label, fn in steps:
                if bar is not None:
                    bar.set_postfix_str(label)
                fn()
                if bar is not None:
                    bar.update(1)
        finally:
            torch.set_num_threads(saved)
            if bar is not None:
                bar.close()
        return self.profile()

    # -- stages ---------------------------------------------------------------------------
    def _load(self) -> None:
        import torch

        from epd.device import torch_dtype
        from epd.models.qwen2_runner import Qwen2VLRunner
        from epd.models.qwen2_vl import Qwen2VLAdapter

        self.adapter = Qwen2VLAdapter.load(self.model_dir, dtype=torch_dtype(self.dtype))
        self.runner = Qwen2VLRunner(self.adapter)
        self.images = sample_images(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)

    def _set(self, t: int) -> None:
        import torch

        torch.set_num_threads(t)

    def _encode(self, t: int, sizes: list[tuple[int, int]]) -> None:
        self._set(t)
        imgs = [self.images[s][0] for s in sizes]
        secs = timed(lambda: self.adapter.encode(imgs), self.reps)
        feats = [(self.adapter.geometry.num_image_tokens(w, h)[0] * self.adapter.merge_size ** 2, w * h)
                 for w, h in sizes]
        self.samples["encode"][t].append({"x": encode_x(feats), "s": secs, "what": f"{len(sizes)}x{sizes[0]}"})

    def _jpeg(self, t: int, size: tuple[int, int]) -> None:
        from PIL import Image

        self._set(t)
        raw = self.images[size][1]

        def decode():
            img = Image.open(io.BytesIO(raw))
            img.load()
            img.convert("RGB")

        secs = timed(decode, self.reps)
        self.samples["image_decode"][t].append({"x": image_decode_x(size[0] * size[1]), "s": secs,
                                                "what": f"{size}"})

    def _prefill(self, t: int, lens: list[int], images: int = 0) -> None:
        """Packed prefill of prompts of ``lens`` text tokens; with ``images``, one prompt of that
        many 448² images (placeholder runs + features, as the gateway and prefill build them)."""
        import torch

        self._set(t)
        a = self.adapter
        limit = self._max_len()
        lens = [min(n, limit) for n in lens]
        ids = [torch.randint(10, a.vocab_size - 20, (n,), generator=self.gen).tolist() for n in lens]
        feats, grids = [], []
        if images:
            tokens, grid = a.geometry.num_image_tokens(448, 448)
            for _ in range(images):
                ids[0] = ids[0] + [a.image_token_id] * tokens + ids[0][:4]
                feats.append(torch.randn(tokens, a.hidden_size, generator=self.gen).to(a.dtype))
                grids.append(tuple(grid))
            lens = [len(i) for i in ids]

        def run():  # as PrefillEngine._run: prompt inputs per request, one packed forward
            inputs = [a.prompt_inputs(i, feats if k == 0 else [], grids if k == 0 else []) for k, i in enumerate(ids)]
            self.runner.prefill(torch.cat([e for e, _, _ in inputs]), torch.cat([p for _, p, _ in inputs], dim=1),
                                lens)

        secs = timed(run, self.reps)
        self.samples["prefill"][t].append({"x": prefill_x(lens, images), "s": secs,
                                           "what": f"{len(lens)}x{lens[0]} {images} img"})

    def _max_len(self) -> int:
        text = self.adapter.model.config.text_config
        return int(getattr(text, "max_position_embeddings", 4096) or 4096) - 8

    def _decode(self, t: int, batch: int, ctx: int) -> None:
        """One step as ``services.decode.core.DecodeEngine.step`` runs it (schedule, block tables,
        batched forward, per-request sampling), timed over several steps."""
        import torch

        from epd.engine.decode_scheduler import DecodeScheduler, PendingAlloc
        from epd.engine.kv_pool import KvLayout, KvPool
        from epd.engine.sampling import Sampler, SamplingParams, finish_reason

        self._set(t)
        ctx = min(ctx, self._max_len() - 16)
        a = self.adapter
        block = 16
        steps = 4 if self.quick or batch * ctx >= 16384 else 8  # a big step is timed well by fewer
        per_req = -(-(ctx + steps * (self.reps + 2) + 1) // block) + 1
        layout = KvLayout(a.num_layers, batch * per_req + batch + 2, block, a.num_kv_heads, a.head_dim, self.dtype)
        pool = KvPool(layout)
        pool.kv.normal_(generator=self.gen)
        sched = DecodeScheduler(pool.allocator, block, batch)
        params = SamplingParams(max_tokens=1 << 30, ignore_eos=True)
        for i in range(batch):
            sched.enqueue(PendingAlloc(str(i), ctx, 1e18, ""))
        sched.admit()
        for i in range(batch):
            sched.start(str(i), 11 + i, 0, 1e18, Sampler(params, a.device))

        def step():
            reqs, _ = sched.schedule()
            width = max(len(r.block_ids) for r in reqs)
            tables = torch.tensor([r.block_ids + [r.block_ids[0]] * (width - len(r.block_ids)) for r in reqs])
            logits = self.runner.decode(torch.tensor([r.tokens[-1] for r in reqs]),
                                        torch.tensor([r.past_len + r.rope_delta for r in reqs]), pool.kv, tables,
                                        torch.tensor([r.past_len for r in reqs]))
            for row, r in enumerate(reqs):
                r.past_len += 1
                tok = r.ctx.sample(logits[row])
                r.tokens.append(tok)
                finish_reason(tok, len(r.tokens), params, set())

        def run():
            for _ in range(steps):
                step()

        secs = timed(run, self.reps) / steps
        self.samples["decode"][t].append({"x": decode_x(batch, ctx + steps), "s": secs, "what": f"b{batch} c{ctx}"})

    def _transfer(self) -> None:
        self.transfer_samples.extend(measure_transfer(self.backend, self.reps))

    def _host(self) -> None:
        """Front-end and control-plane costs (single-threaded Python; threads do not matter)."""
        self.host = measure_host(self.model_dir, self.images, self.reps)

    def _front_end(self) -> None:
        """The gateway's and the client's CPU costs on a running deployment (:mod:`epd.plan.frontend`)."""
        from epd.plan.frontend import measure_front_end

        got = measure_front_end(self.model_dir, self.dtype, seed=self.seed)
        self.host = {**self.host, "gateway": got["gateway"], "client": got["client"]}
        self.front_end_runs = {"runs": got["front_end_runs"], "gateway_idle_cpu": got["gateway_idle_cpu"]}

    def _parallel(self) -> None:
        """Work of ``cores`` one-thread processes at once vs one alone, and the pairwise stage
        slowdowns (:mod:`epd.plan.parallel`)."""
        from epd.cores import usable_cores
        from epd.plan.parallel import measure

        secs = 2.0 if self.quick else 4.0
        self.parallel = measure(self.model_dir, self.dtype, usable_cores(), seconds=secs * 0.45,
                                pair_seconds=secs, colocated_seconds=secs * 0.45)

    # -- result ---------------------------------------------------------------------------
    def _template(self) -> tuple[int, int]:
        """``(template tokens around the text, extra tokens per image besides its placeholders)``."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model_dir)
        text = "hello world"
        n_text = len(tok(text, add_special_tokens=False)["input_ids"])

        def count(parts):
            rendered = tok.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                               tokenize=False)
            return len(tok(rendered, add_special_tokens=False)["input_ids"])

        plain = count([{"type": "text", "text": text}])
        one = count([{"type": "image"}, {"type": "text", "text": text}])
        return plain - n_text, one - plain - 1

    def profile(self) -> Profile:
        a = self.adapter
        template, wrap = self._template()
        vision = sum(p.numel() * p.element_size() for p in a.model.model.visual.parameters())
        total = sum(p.numel() * p.element_size() for p in a.model.parameters())
        geo = a.geometry
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            mem = 0
        from epd.cores import usable_cores

        stages = {s: {t: CostModel.fitted(s, per[t]) for t in self.threads} for s, per in self.samples.items()}
        prof = Profile(
            device={"kind": "cpu", "name": cpu_name(), "cores": usable_cores(), "memory_bytes": mem,
                    **getattr(self, "parallel", {}),
                    **({"front_end": self.front_end_runs} if hasattr(self, "front_end_runs") else {})},
            model={"name": self.model_dir.name, "path": str(self.model_dir.resolve()), "num_layers": a.num_layers,
                   "hidden_size": a.hidden_size, "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim,
                   "vision_hidden": int(a.model.config.vision_config.embed_dim
                                        if hasattr(a.model.config.vision_config, "embed_dim") else 0),
                   "geometry": {"patch_size": geo.patch_size, "merge_size": geo.merge_size,
                                "min_pixels": geo.min_pixels, "max_pixels": geo.max_pixels},
                   "template_tokens": template, "image_wrap_tokens": wrap,
                   "weights_bytes": {"vision": vision, "language": total - vision}},
            dtype=self.dtype, dtype_bytes=2 if self.dtype in ("bfloat16", "float16") else 4,
            threads=self.threads, transfer_backend=self.backend, stages=stages,
            transfer=CostModel.fitted("transfer", self.transfer_samples), host=self.host, seed=self.seed,
            created=datetime.now().isoformat(timespec="seconds"),
        )
        if hasattr(self, "front_end_runs"):  # the services' overheads and served factors, against the fit
            from epd.plan.calibrate import apply_probe

            prof = apply_probe(prof)
        return prof
