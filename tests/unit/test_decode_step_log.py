"""The decode core logs each finished request's step count and mean step time (what ``epd
profile``'s deployment probe reads back, :mod:`epd.plan.servicelog`)."""

from __future__ import annotations

import logging

import torch

from epd.engine.kv_pool import KvLayout, KvPool
from epd.engine.sampling import SamplingParams
from services.decode.core import FINISHED_MSG, DecodeEngine


class _Runner:
    """Greedy logits that always pick token 7; each forward takes a known time."""

    device = torch.device("cpu")

    def decode(self, last, pos, kv, tables, past):
        import time

        time.sleep(0.002)
        out = torch.zeros(len(last), 16)
        out[:, 7] = 1.0
        return out


def test_finished_requests_log_their_steps_and_mean_step_time(caplog):
    pool = KvPool(KvLayout(1, 16, 4, 1, 8, "float32"))
    engine = DecodeEngine(_Runner(), pool, max_batch=4, eos_token_ids=set())
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
    for rid in ("a", "b"):
        engine.request_blocks(rid, 8, 1e18, "")
    engine.step()  # admits both
    engine.start("a", 3, 0, params, 1e18)
    engine.start("b", 3, 0, SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0), 1e18)
    with caplog.at_level(logging.INFO, logger="services.decode.core"):
        for _ in range(4):
            engine.step()
    lines = [r for r in caplog.records if r.msg == FINISHED_MSG]
    assert [r.args[:3] for r in lines] == [("b", 2, 1), ("a", 4, 3)]  # first token from prefill: n - 1 steps
    assert all(r.args[3] >= 2.0 for r in lines)  # ms, each step holds a 2 ms forward
