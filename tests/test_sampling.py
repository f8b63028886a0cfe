"""Sampling steps match transformers' logits processors; seeds make draws reproducible."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from runtime.sampling import Sampler, Sampling

rng = np.random.default_rng(0)
LOGITS = rng.standard_normal(1000).astype(np.float32) * 3
CONTEXT = rng.integers(0, 1000, 60)


def test_greedy_with_penalty_matches_transformers():
    for penalty in (1.0, 1.05, 1.5):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(CONTEXT)[None], torch.tensor(LOGITS)[None])
        chosen = Sampler(Sampling(temperature=0, repetition_penalty=penalty))(LOGITS, CONTEXT)
        assert chosen == int(ref.argmax())


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (20, 1.0), (0, 0.8), (50, 0.5), (1, 1.0)])
def test_support_matches_transformers_warpers(top_k, top_p):
    """Every token we can draw is one transformers keeps, and the other way round."""
    scores = RepetitionPenaltyLogitsProcessor(1.05)(torch.tensor(CONTEXT)[None], torch.tensor(LOGITS)[None])
    scores = TemperatureLogitsWarper(0.9)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = set(torch.nonzero(torch.isfinite(scores[0])).ravel().tolist())
    sampler = Sampler(Sampling(0.9, top_k, top_p, 1.05, seed=1))
    drawn = {sampler(LOGITS, CONTEXT) for _ in range(3000)}
    assert drawn <= expected
    if len(expected) <= 30:
        assert drawn == expected


def test_seed_makes_sampling_reproducible():
    draws = [[Sampler(Sampling(seed=seed))(LOGITS, CONTEXT) for _ in range(1)] for seed in (3, 3, 4)]
    a = Sampler(Sampling(seed=7))
    b = Sampler(Sampling(seed=7))
    assert [a(LOGITS, CONTEXT) for _ in range(50)] == [b(LOGITS, CONTEXT) for _ in range(50)]
    assert draws[0] == draws[1]


def test_temperature_sharpens_the_distribution():
    logits = np.array([2.0, 1.0, 0.0], np.float32)
    counts = {t: np.bincount([Sampler(Sampling(temperature=t, repetition_penalty=1.0, seed=s))(logits, np.array([]))
                              for s in range(400)], minlength=3) for t in (0.3, 3.0)}
    assert counts[0.3][0] > 350 and counts[3.0][0] < 250
