"""Logit filters on hand-made logits, and that sampling draws from the filtered distribution."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.core.errors import ConfigError
from alignlab.rollout.engine import SamplingParams, sample_next
from alignlab.rollout.filters import apply_temperature, min_p_filter, top_k_filter, top_p_filter

# probabilities 0.15, 0.5, 0.05, 0.3 (deliberately not sorted)
PROBS = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
LOGITS = PROBS.log()


def kept(logits):
    return torch.isfinite(logits)[0].tolist()


def test_temperature_scales_logits_and_rejects_zero():
    assert apply_temperature(torch.tensor([2.0, 4.0]), 2.0).tolist() == [1.0, 2.0]
    assert apply_temperature(torch.tensor([2.0, 4.0]), 0.5).tolist() == [4.0, 8.0]
    with pytest.raises(ConfigError, match="temperature"):
        apply_temperature(torch.tensor([1.0]), 0.0)


def test_top_k_keeps_k_largest_and_ties():
    assert kept(top_k_filter(LOGITS, 2)) == [False, True, False, True]
    assert kept(top_k_filter(LOGITS, 1)) == [False, True, False, False]
    assert kept(top_k_filter(LOGITS, 0)) == [True] * 4
    assert kept(top_k_filter(torch.tensor([[1.0, 1.0, 0.0]]), 1)) == [True, True, False]


@pytest.mark.parametrize("p, expected", [
    (0.4, [False, True, False, False]),   # 0.5 alone reaches 0.4
    (0.7, [False, True, False, True]),    # 0.5 + 0.3
    (0.85, [True, True, False, True]),    # 0.5 + 0.3 + 0.15
    (0.99, [True, True, True, True]),
])
def test_top_p_keeps_smallest_nucleus(p, expected):
    assert kept(top_p_filter(LOGITS, p)) == expected
    # the kept logits are untouched
    out = top_p_filter(LOGITS, p)
    assert torch.equal(out[torch.isfinite(out)], LOGITS[torch.isfinite(out)])


def test_top_p_rowwise_on_a_large_vocabulary():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 3
    out = top_p_filter(logits, 0.9)
    for row, filtered in zip(logits, out):
        probs, order = torch.softmax(row, -1).sort(descending=True)
        size = int(((probs.cumsum(0) - probs) < 0.9).sum())
        assert set(order[:size].tolist()) == set(torch.isfinite(filtered).nonzero().flatten().tolist())


def test_min_p_threshold_is_relative_to_the_top_token():
    # threshold 0.35 * 0.5 = 0.175 keeps 0.5 and 0.3
    assert kept(min_p_filter(LOGITS, 0.35)) == [False, True, False, True]
    assert kept(min_p_filter(LOGITS, 0.25)) == [True, True, False, True]
    assert kept(min_p_filter(LOGITS, 0.0)) == [True] * 4


def test_sampling_frequencies_follow_the_truncated_distribution():
    logits = LOGITS.repeat(40_000, 1)
    params = SamplingParams(temperature=1.0, top_k=3)
    tokens, logp = sample_next(logits, params, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    expected = torch.tensor([0.15, 0.5, 0.0, 0.3]) / 0.95
    assert (freq - expected).abs().max() < 0.01
    # log-probs are those of the untruncated (temperature-scaled) distribution
    assert torch.allclose(logp, PROBS[0].log()[tokens], atol=1e-6)


def test_greedy_log_prob_is_the_untempered_one():
    tokens, logp = sample_next(LOGITS, SamplingParams(temperature=0), None)
    assert tokens.tolist() == [1] and math.isclose(logp.item(), math.log(0.5), rel_tol=1e-6)
