import torch

from epd.engine.sampling import Sampler, SamplingParams, finish_reason


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert Sampler(SamplingParams(temperature=0), torch.device("cpu")).sample(logits) == 1


def test_seed_reproducible_and_topk_restricts():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, top_k=3, seed=7)
    a = [Sampler(p, torch.device("cpu")).sample(logits) for _ in range(3)]
    s = Sampler(p, torch.device("cpu"))
    seq1 = [s.sample(logits) for _ in range(20)]
    s2 = Sampler(p, torch.device("cpu"))
    assert seq1 == [s2.sample(logits) for _ in range(20)]
    assert len(set(a)) == 1
    assert set(seq1) <= set(torch.topk(logits, 3).indices.tolist())


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0), torch.device("cpu"))
    assert {s.sample(logits) for _ in range(200)} == {0, 1}


def test_finish_reason():
    p = SamplingParams(max_tokens=3, stop_token_ids=[9])
    assert finish_reason(5, 1, p, {2}) is None
    assert finish_reason(2, 1, p, {2}) == "stop"
    assert finish_reason(9, 1, p, {2}) == "stop"
    assert finish_reason(5, 3, p, {2}) == "length"
    assert finish_reason(2, 1, SamplingParams(max_tokens=3, ignore_eos=True), {2}) is None
