"""Sampler: greedy, temperature/top-k/top-p as transformers, seeded determinism, penalty, logprobs."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from inference_worker.interfaces import SamplingConfig
from inference_worker.sampler import Sampler, apply_repetition_penalty, processed_probs

V = 50


def logits_of(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def run(sampler, logits, params, generators=None, histories=None):
    n = len(params)
    return sampler(logits.clone(), params, generators or [None] * n, histories or [[] for _ in range(n)])


def test_greedy_is_argmax():
    logits = logits_of(0, rows=4)
    ids, lps = run(Sampler(torch.device("cpu")), logits, [SamplingConfig(temperature=0.0)] * 4)
    assert ids == logits.argmax(-1).tolist() and lps == [None] * 4


def test_seed_gives_same_tokens_whatever_the_batch():
    sampler = Sampler(torch.device("cpu"))
    mine = logits_of(1)
    params = SamplingConfig(temperature=1.0, top_p=0.9, top_k=20, seed=42)

    def draws(companions: int) -> list[int]:
        gen = torch.Generator().manual_seed(42)
        others = logits_of(2, rows=companions)
        out = []
        for _ in range(8):
            logits = torch.cat([others[: companions // 2], mine, others[companions // 2:]])
            gens = [None] * (companions // 2) + [gen] + [torch.Generator().manual_seed(7)] * (companions - companions // 2)
            ps = [SamplingConfig(temperature=0.7)] * (companions // 2) + [params] + \
                 [SamplingConfig(temperature=1.3, seed=7)] * (companions - companions // 2)
            ids, _ = run(sampler, logits, ps, gens)
            out.append(ids[companions // 2])
        return out

    alone, crowded, other_crowd = draws(0), draws(5), draws(2)
    assert alone == crowded == other_crowd
    assert len(set(alone)) > 1                     # it does sample, not argmax


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.6),
                                                     (1.0, 1, 1.0), (2.0, 0, 0.05)])
def test_processing_matches_transformers_warpers(temperature, top_k, top_p):
    logits = logits_of(3, rows=3)
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    expected = expected.softmax(-1)
    got = processed_probs(logits.clone(), [SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)] * 3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_draws_stay_in_top_k_and_follow_the_distribution():
    sampler = Sampler(torch.device("cpu"), seed=3)
    logits = logits_of(4)
    params = SamplingConfig(temperature=1.0, top_k=3)
    top3 = set(logits[0].topk(3).indices.tolist())
    counts = torch.zeros(V)
    for _ in range(3000):
        (token,), _ = run(sampler, logits, [params])
        counts[token] += 1
    assert set(counts.nonzero()[:, 0].tolist()) <= top3
    expected = processed_probs(logits.clone(), [params])[0]
    assert (counts / counts.sum() - expected).abs().max() < 0.04


def test_repetition_penalty_matches_transformers():
    logits = logits_of(5, rows=1)
    history = [3, 7, 7, 11, 42, 0]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits.clone())
    got = logits.clone()
    apply_repetition_penalty(got[0], history, 1.3)
    torch.testing.assert_close(got, expected)
    # and through the sampler: the greedy choice moves off a penalised token
    row = torch.zeros(1, V)
    row[0, 5], row[0, 6] = 2.0, 1.9
    ids, _ = run(Sampler(torch.device("cpu")), row, [SamplingConfig(temperature=0.0, repetition_penalty=1.2)],
                 histories=[[5]])
    assert ids == [6]


def test_logprobs_are_raw_model_logprobs():
    logits = logits_of(6, rows=2)
    params = [SamplingConfig(temperature=0.5, top_k=2, logprobs=3, seed=1, repetition_penalty=1.5),
              SamplingConfig(temperature=0.0)]
    ids, lps = run(Sampler(torch.device("cpu")), logits, params, [torch.Generator().manual_seed(1), None],
                   [[int(logits[0].argmax())], []])
    raw = logits.log_softmax(-1)
    assert lps[1] is None
    lp = lps[0]
    assert lp.token_id == ids[0]
    assert lp.logprob == pytest.approx(raw[0, ids[0]].item(), abs=1e-6)
    values, top_ids = raw[0].topk(3)
    assert [t for t, _ in lp.top] == top_ids.tolist()
    assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)


def test_batched_rows_match_each_row_alone():
    """Greedy, seeded and shared-stream rows in one batch: greedy rows are argmax (after the
    penalty), a seeded row draws what it draws alone with its seed."""
    sampler = Sampler(torch.device("cpu"))
    logits = logits_of(4, rows=5)
    params = [SamplingConfig(temperature=0.0), SamplingConfig(temperature=0.8, top_k=10, seed=3),
              SamplingConfig(temperature=1.0), SamplingConfig(temperature=1.2, top_p=0.7, seed=9),
              SamplingConfig(temperature=0.0, repetition_penalty=1.5)]
    gens = [None, torch.Generator().manual_seed(3), None, torch.Generator().manual_seed(9), None]
    histories = [[], [], [], [], [1, 2, 3]]
    ids, _ = run(sampler, logits, params, gens, histories)
    assert ids[0] == logits[0].argmax().item()
    penalized = logits[4].clone()
    apply_repetition_penalty(penalized, [1, 2, 3], 1.5)
    assert ids[4] == penalized.argmax().item()
    for i in (1, 3):
        alone, _ = run(Sampler(torch.device("cpu")), logits[i:i + 1], [params[i]],
                       [torch.Generator().manual_seed(params[i].seed)])
        assert ids[i] == alone[0]
    assert 0 <= ids[2] < V
