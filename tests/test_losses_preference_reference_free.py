"""SimPO, ORPO, CPO, SLiC-HF and SFT: no reference model, hand-computed values."""

import math

import pytest
import torch

from alignlab.losses.preference import PREFERENCE_LOSSES, PreferenceInputs, loss_spec


def ls(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def policy_only(c=-3.0, r=-5.0, lc=2, lr=5):
    """avg log-probs: chosen −1.5, rejected −1.0."""
    return PreferenceInputs(chosen_logps=t(c), rejected_logps=t(r),
                            chosen_lengths=torch.tensor([lc]), rejected_lengths=torch.tensor([lr]))


def run(name, inputs, **kw):
    return PREFERENCE_LOSSES.get(name)(inputs, **kw)


def test_reference_free_specs():
    for name in ("simpo", "orpo", "cpo", "slic_hf", "sft", "pro"):
        assert loss_spec(name).needs_reference is False


def test_simpo_value_without_reference_and_length_normalised():
    result = run("simpo", policy_only(), beta=2.0, gamma=0.5)
    z = 2.0 * (-1.5 + 1.0) - 0.5
    assert result.losses.item() == pytest.approx(-ls(z))
    assert result.chosen_rewards.item() == pytest.approx(-3.0)  # β·π_c/|y_c|
    # doubling log-probs and lengths leaves per-token averages, hence the loss, unchanged
    doubled = run("simpo", policy_only(c=-6.0, r=-10.0, lc=4, lr=10), beta=2.0, gamma=0.5)
    assert doubled.losses.item() == pytest.approx(result.losses.item())


def test_alphapo_reward_shape_value():
    # per-token log-probs −1.5 and −1.0; r_α = (1 − e^{−α·ℓ})/α
    r = lambda mean, alpha: -math.expm1(-alpha * mean) / alpha  # noqa: E731
    result = run("alphapo", policy_only(), beta=2.0, gamma=0.3, alpha=0.5)
    assert result.losses.item() == pytest.approx(-ls(2.0 * (r(-1.5, 0.5) - r(-1.0, 0.5)) - 0.3))
    assert result.chosen_rewards.item() == pytest.approx(2.0 * r(-1.5, 0.5))
    # defaults: Mistral-Instruct's α = 0.25, β = 2.5, γ = 0.1
    assert run("alphapo", policy_only()).losses.item() == pytest.approx(
        -ls(2.5 * (r(-1.5, 0.25) - r(-1.0, 0.25)) - 0.1))
    # α = 0 is SimPO
    assert run("alphapo", policy_only(), beta=2.0, gamma=0.5, alpha=0.0).losses.item() == \
        pytest.approx(run("simpo", policy_only(), beta=2.0, gamma=0.5).losses.item())


def test_orpo_value_and_odds_ratio_term():
    pc, pr = -1.5, -1.0
    log_odds = (pc - pr) - (math.log1p(-math.exp(pc)) - math.log1p(-math.exp(pr)))
    result = run("orpo", policy_only(), beta=0.1)
    assert result.metrics["orpo/log_odds_chosen"].item() == pytest.approx(log_odds)
    assert result.metrics["orpo/log_odds_ratio"].item() == pytest.approx(ls(log_odds))
    assert result.losses.item() == pytest.approx(1.5 - 0.1 * ls(log_odds))
    # β = 0 leaves the SFT term only
    assert run("orpo", policy_only(), beta=0.0).losses.item() == pytest.approx(1.5)


def test_orpo_near_certain_completions():
    # p = 1 (log p = 0) on the rejected side: log(1 − p) is read at log p = −1e-6, finite
    def log_odds(pc, pr):
        log1m = lambda lp: math.log1p(-math.exp(min(lp, -1e-6)))  # noqa: E731
        return (pc - pr) - (log1m(pc) - log1m(pr))

    for r, pr in ((0.0, 0.0), (-2.5, -0.5)):  # rejected: 5 tokens, per-token log p = pr
        result = run("orpo", policy_only(r=r), beta=0.1)
        expected = log_odds(-1.5, pr)
        assert result.metrics["orpo/log_odds_chosen"].item() == pytest.approx(expected)
        assert result.losses.item() == pytest.approx(1.5 - 0.1 * ls(expected))


def test_cpo_value():
    assert run("cpo", policy_only(), beta=0.1, alpha=1.0).losses.item() == pytest.approx(-ls(0.2) + 1.5)


def test_slic_hf_value():
    assert run("slic_hf", policy_only()).losses.item() == 0.0  # π_c − π_r = 2 ≥ δ = 1
    close = policy_only(r=-3.5)
    assert run("slic_hf", close, delta=1.0).losses.item() == pytest.approx(0.5)
    assert run("slic_hf", close, delta=1.0, lambda_reg=0.1).losses.item() == pytest.approx(0.5 + 0.3)


def test_sft_is_per_token_nll():
    assert run("sft", policy_only()).losses.item() == pytest.approx(1.5)
