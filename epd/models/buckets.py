"""GEMM row buckets: how many rows a bf16/fp16 forward on the CPU pads its token or patch batch to.

On the CPU, torch runs bfloat16 and float16 matmuls through oneDNN, whose kernels (AMX/AVX-512
brgemm) are generated at run time for each shape and kept in a primitive cache. The first GEMM of
a new row count pays that generation: measured on an AMX Xeon, one ``[M, 256] x [256, 1024]`` bf16
linear took 134 µs when its shape was cached and ~1.15 ms on a new ``M``; a tiny-preset prefill
of a new length took 20.5 ms against 10.9 ms warm, a 448²-class encode 94 against 77 ms. A served
prefill sees a new packed length on almost every batch (it sums the prompts' lengths), so unpadded
it ran 2.3–3.8× its warm cost (``epd profile``'s fit) in an ``epd up`` sweep. Float32 takes MKL's
SGEMM, which generates nothing per shape, and GPUs take cuBLAS: neither is padded.

Padding rounds the rows up to one of 8 buckets per octave (at most +12.5 % rows above 128, 16-row
steps below), so a server meets a few dozen shapes in all and each one's kernels once. The padded
rows never mix with the real ones (row-wise GEMMs and norms; attention runs per prompt or per
image), and their outputs are dropped.
"""

from __future__ import annotations

import torch

MIN_STEP = 16  # rows; also a multiple of the vision merger's 2 x 2 patch group

_PADDED_DTYPES = (torch.bfloat16, torch.float16)


def padded_rows(n: int, dtype: torch.dtype, device: torch.device) -> int:
    """The row count a forward of ``n`` rows (tokens or patches) should run with.

    Args:
        n: real rows, ≥ 0.
        dtype: the model dtype.
        device: the model device.

    Returns:
        ``n`` itself unless the device is a CPU and ``dtype`` bfloat16/float16; then ``n`` rounded
        up to a multiple of ``max(16, 2**(bit_length(n) - 4))`` (8 buckets per octave), so
        ``n ≤ result < n + max(16, n / 8)`` and ``result % 16 == 0``.
    """
    if n <= 0 or device.type != "cpu" or dtype not in _PADDED_DTYPES:
        return n
    step = max(MIN_STEP, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


#: rows per GEMM under ``EPD_BATCH_INVARIANT`` (AMX tiles hold 16 rows; measured on tiny, 1 thread:
#: prefill of 288 tokens 14.4 ms at 64 rows a call against 8.0 ms unchunked, 16.2 at 32, 13.9 at 256)
INVARIANT_ROWS = 64


def _fixed_rows_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` over calls of exactly :data:`INVARIANT_ROWS` rows (the last padded with
    zeros), so that every row takes the same kernel whatever the batch it came in."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    n = rows.shape[0]
    if pad := -n % INVARIANT_ROWS:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    out = torch.cat([torch.nn.functional.linear(c, self.weight, self.bias) for c in rows.split(INVARIANT_ROWS)])
    return out[:n].reshape(*shape[:-1], out.shape[-1])


def make_batch_invariant(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Make every ``nn.Linear`` of ``model`` compute a row the same way whatever batch it is in.

    oneDNN picks its bf16 GEMM kernel by the row count, and on AMX the kernels round differently:
    measured, a ``[M, 1024] x [1024, 256]`` bf16 linear gives rows that differ (by bf16 ulps) from
    the same rows at ``M = 400`` for every ``M`` in 98–255, so a prompt prefilled alone and packed
    with others got different logits, and one of the four tiny-preset test requests different
    greedy tokens. Running every GEMM on exactly :data:`INVARIANT_ROWS` rows removes that (the
    approach of vLLM's ``VLLM_BATCH_INVARIANT`` and SGLang's deterministic inference: a fixed
    split whatever the batch). It costs time (AMX, 1 thread, tiny and mid presets,
    ``benchmarks/gemm_shapes.py``: prefill ×1.8–1.9, encode ×1.2–1.4, the decode's linears
    ×1.4–1.7) and is opt-in: ``EPD_BATCH_INVARIANT=1``.

    Args:
        model: the loaded HF model (vision tower and/or language model).
        dtype, device: the model's; float32 (MKL SGEMM) and accelerators are left alone.

    Returns:
        How many linear layers were switched (0 where nothing was changed).
    """
    if device.type != "cpu" or dtype not in _PADDED_DTYPES:
        return 0
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for m in layers:
        m.forward = _fixed_rows_linear.__get__(m)
    return len(layers)
