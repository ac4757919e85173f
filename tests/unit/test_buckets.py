"""GEMM row buckets (epd.models.buckets): bounded padding, few shapes, only where oneDNN JITs."""

from __future__ import annotations

import torch

from epd.models.buckets import padded_rows

CPU = torch.device("cpu")


def test_buckets_bound_the_padding_and_keep_merger_groups():
    for n in range(1, 20_000):
        m = padded_rows(n, torch.bfloat16, CPU)
        assert n <= m < n + max(16, n / 8), n
        assert m % 16 == 0, n
        assert padded_rows(m, torch.bfloat16, CPU) == m, n  # a bucket is its own bucket


def test_a_server_meets_a_few_dozen_shapes():
    shapes = {padded_rows(n, torch.float16, CPU) for n in range(1, 16_385)}
    assert len(shapes) <= 8 + 8 * 7  # 16-row steps to 128, then 8 per octave to 16384


def test_float32_and_accelerators_run_unpadded():
    for n in (1, 17, 281, 1124, 9999):
        assert padded_rows(n, torch.float32, CPU) == n
        assert padded_rows(n, torch.bfloat16, torch.device("cuda")) == n
    assert padded_rows(0, torch.bfloat16, CPU) == 0


def test_batch_invariant_mode_computes_a_row_alike_in_any_batch():
    from epd.models.buckets import make_batch_invariant

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 256), torch.nn.Linear(256, 1024)).to(torch.bfloat16)
    assert make_batch_invariant(model, torch.bfloat16, CPU) == 2
    x = torch.randn(400, 1024).to(torch.bfloat16)
    full = model(x)
    for m in (1, 2, 63, 64, 65, 100, 200, 255):  # 98–255 rounded differently unchunked on AMX (measured)
        assert torch.equal(model(x[:m]), full[:m]), m
    assert model(x[:5, None, :]).shape == (5, 1, 1024)


def test_batch_invariant_mode_leaves_float32_alone():
    from epd.models.buckets import make_batch_invariant

    model = torch.nn.Linear(8, 8)
    assert make_batch_invariant(model, torch.float32, CPU) == 0
    assert "forward" not in vars(model)
