"""Every metric the policy and value losses log, at ratios away from 1, by hand (the metrics
are what a run is judged by; at ρ = 1 many wrong formulas agree)."""

import math

import pytest
import torch

from alignlab.losses.policy import POLICY_LOSSES
from alignlab.losses.rollout_correction import RolloutCorrection
from alignlab.losses.value import VALUE_LOSSES

RATIOS = [[1.5, 0.5, 1.0], [0.5, 1.1, 2.0]]
ADV = torch.tensor([[1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)


def _batch(mask=((1, 1, 1), (1, 1, 1))):
    logprobs = torch.tensor(RATIOS, dtype=torch.float64).log()
    return dict(logprobs=logprobs, old_logprobs=torch.zeros_like(logprobs), advantages=ADV,
                mask=torch.tensor(mask))


def _k3(r: float) -> float:
    return (r - 1) - math.log(r)


def test_ppo_metrics_away_from_ratio_one():
    out = POLICY_LOSSES.get("ppo_clip")(**_batch(), clip_eps_low=0.2)
    m = out.metrics
    flat = [r for row in RATIOS for r in row]
    assert m["ratio_mean"].item() == pytest.approx(sum(flat) / 6)
    # CleanRL's approx_kl: mean of (ρ − 1) − log ρ, ≥ 0 (the other sign is ≤ 0)
    assert m["approx_kl"].item() == pytest.approx(sum(_k3(r) for r in flat) / 6)
    assert m["approx_kl"].item() > 0
    # clipped where the clipped term is the larger: (0,0) high (ρ 1.5, A > 0), (1,0) low
    assert m["clip_fraction"].item() == pytest.approx(2 / 6)
    assert m["clip_fraction_high"].item() == pytest.approx(1 / 6)
    assert m["clip_fraction_low"].item() == pytest.approx(1 / 6)
    torch.testing.assert_close(out.per_token_loss, torch.tensor(
        [[-1.2, -0.5, 1.0], [0.8, 1.1, 2.0]], dtype=torch.float64))


def test_ppo_metrics_are_means_over_the_mask_only():
    out = POLICY_LOSSES.get("ppo_clip")(**_batch(mask=((1, 1, 0), (1, 0, 0))))
    assert out.metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 0.5) / 3)
    assert out.metrics["approx_kl"].item() == pytest.approx((_k3(1.5) + 2 * _k3(0.5)) / 3)
    assert out.metrics["clip_fraction"].item() == pytest.approx(2 / 3)


def test_ppo_clip_higher_and_dual_clip_values_and_fraction():
    out = POLICY_LOSSES.get("ppo_clip")(**_batch(), clip_eps_low=0.2, clip_eps_high=0.3,
                                        dual_clip_c=1.5)
    # ε_high = 0.3: (0,0) clipped at 1.3; dual clip: (1,2) loss 2 > −c·A = 1.5 is capped
    torch.testing.assert_close(out.per_token_loss, torch.tensor(
        [[-1.3, -0.5, 1.0], [0.8, 1.1, 1.5]], dtype=torch.float64))
    assert out.metrics["dual_clip_fraction"].item() == pytest.approx(1 / 6)


def test_gspo_sequence_ratio_metric():
    out = POLICY_LOSSES.get("gspo")(**_batch(mask=((1, 1, 0), (1, 1, 1))))
    seq = [math.exp((math.log(1.5) + math.log(0.5)) / 2),
           math.exp((math.log(0.5) + math.log(1.1) + math.log(2.0)) / 3)]
    assert out.metrics["seq_ratio_mean"].item() == pytest.approx(sum(seq) / 2)


def test_cispo_clip_fraction_and_bounds():
    b = _batch()
    out = POLICY_LOSSES.get("cispo")(**b, clip_eps_low=0.2, clip_eps_high=0.4)
    # weights clip(ρ, 0.8, 1.4): 1.5 → 1.4, 0.5 → 0.8 (twice), 2.0 → 1.4; 1.0 and 1.1 kept
    assert out.metrics["clip_fraction"].item() == pytest.approx(4 / 6)
    w = torch.tensor([[1.4, 0.8, 1.0], [0.8, 1.1, 1.4]], dtype=torch.float64)
    torch.testing.assert_close(out.per_token_loss, -w * ADV * b["logprobs"])


def test_kl_and_entropy_metrics_and_terms():
    b = _batch(mask=((1, 1, 1), (1, 1, 0)))
    ref = b["logprobs"] - 0.5
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], dtype=torch.float64)
    out = POLICY_LOSSES.get("reinforce")(**b, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k1",
                                         entropy=entropy, entropy_coef=0.01)
    assert out.metrics["kl"].item() == pytest.approx(0.5)
    assert out.metrics["entropy"].item() == pytest.approx(15 / 5)
    expected = -ADV * b["logprobs"] + 0.1 * 0.5 - 0.01 * entropy
    torch.testing.assert_close(out.per_token_loss, expected * b["mask"])


def test_rollout_correction_metrics():
    b = _batch(mask=((1, 1, 1), (1, 1, 0)))
    # old − rollout = log 3 on the first token, log 0.25 on the second, 0 elsewhere
    diff = torch.tensor([[math.log(3.0), math.log(0.25), 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    rollout = b["old_logprobs"] - diff
    out = POLICY_LOSSES.get("ppo_clip")(**b, rollout_logprobs=rollout,
                                        rollout_correction=RolloutCorrection("tis", low=0.5, high=2.0))
    m = out.metrics
    assert m["rollout_is/abs_logp_diff_mean"].item() == pytest.approx(
        (math.log(3.0) + math.log(4.0)) / 5)
    assert m["rollout_is/abs_logp_diff_max"].item() == pytest.approx(math.log(4.0))
    assert m["rollout_is/ratio_mean"].item() == pytest.approx((3.0 + 0.25 + 3) / 5)
    assert m["rollout_is/weight_mean"].item() == pytest.approx((2.0 + 0.5 + 3) / 5)
    assert m["rollout_is/truncated_fraction"].item() == pytest.approx(2 / 5)
    mis = POLICY_LOSSES.get("ppo_clip")(**b, rollout_logprobs=rollout,
                                        rollout_correction=RolloutCorrection("mis", low=0.5))
    assert mis.metrics["rollout_is/masked_fraction"].item() == pytest.approx(2 / 5)
    assert mis.metrics["rollout_is/weight_mean"].item() == pytest.approx(3 / 5)


def test_value_metrics():
    values = torch.tensor([[1.0, 2.0, 3.0], [0.0, 9.0, 9.0]])
    old = torch.tensor([[1.5, 2.0, 2.0], [0.0, 9.0, 9.0]])
    returns = torch.tensor([[2.0, 2.0, 4.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, m = VALUE_LOSSES.get("clipped")(values, old, returns, mask, clip_eps=0.2)
    assert m["value_mean"].item() == pytest.approx(6 / 4)
    # R − V = (1, 0, 1, 1): unbiased var 0.75/3; Var(R) = Var(2, 2, 4, 1) = 4.75/3
    assert m["value_explained_variance"].item() == pytest.approx(1 - 0.75 / 4.75)
    # V_clip = (1.3, 2, 2.2, 0): only at (0,2) is the clipped error larger (1.8² > 1²)
    assert m["value_clip_fraction"].item() == pytest.approx(1 / 4)
    torch.testing.assert_close(loss, torch.tensor([[0.5, 0.0, 1.62], [0.5, 0.0, 0.0]]))


def _one(ratio, advantage):
    lp = torch.tensor([[math.log(ratio)]], dtype=torch.float64)
    return dict(logprobs=lp, old_logprobs=torch.zeros_like(lp),
                advantages=torch.tensor([[advantage]], dtype=torch.float64), mask=torch.ones(1, 1))


def test_ppo_ratio_is_clamped_in_log_space():
    b = _one(1.0, -1.0)
    b["logprobs"] = torch.tensor([[30.0]], dtype=torch.float64)
    out = POLICY_LOSSES.get("ppo_clip")(**b)
    assert out.per_token_loss.item() == pytest.approx(math.exp(20))
    assert out.metrics["approx_kl"].item() == pytest.approx(math.exp(20) - 1 - 20)


def test_dual_clip_boundaries():
    ppo = POLICY_LOSSES.get("ppo_clip")
    # A = −2, ρ = 2: loss max(4, 2.4) = 4, cap −c·A = 3 at c = 1.5
    assert ppo(**_one(2.0, -2.0), dual_clip_c=1.5).per_token_loss.item() == pytest.approx(3.0)
    # exactly at the cap: not counted as dual-clipped
    out = ppo(**_one(2.0, -1.0), dual_clip_c=2.0)
    assert out.per_token_loss.item() == pytest.approx(2.0)
    assert out.metrics["dual_clip_fraction"].item() == 0.0
    # a positive advantage is never dual-clipped, however small
    assert ppo(**_one(1.5, 0.5), dual_clip_c=1.5).per_token_loss.item() == pytest.approx(-0.6)
    with pytest.raises(Exception, match="dual_clip_c must be > 1"):
        ppo(**_one(1.0, 1.0), dual_clip_c=1.0)


def test_gspo_default_clip_range():
    gspo = POLICY_LOSSES.get("gspo")
    # defaults ε_low = 3e-4, ε_high = 4e-4: ρ = 0.9995 with A = −1 → the clipped 0.9997 wins
    assert gspo(**_one(0.9995, -1.0)).per_token_loss.item() == pytest.approx(0.9997, abs=1e-9)
    assert gspo(**_one(1.0005, 1.0)).per_token_loss.item() == pytest.approx(-1.0004, abs=1e-9)


def test_sapo_defaults_and_the_temperature_per_advantage_sign():
    sapo = POLICY_LOSSES.get("sapo")
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # defaults τ_pos = 1 (A > 0, also for A < 1), τ_neg = 1.05
    assert sapo(**_one(1.5, 0.5)).per_token_loss.item() == pytest.approx(-4 * sig(0.5) * 0.5)
    assert sapo(**_one(0.5, -1.0)).per_token_loss.item() == pytest.approx(
        4 / 1.05 * sig(1.05 * -0.5))
    for bad in ({"tau_pos": 0.0}, {"tau_neg": 0.0}):
        with pytest.raises(Exception, match="temperatures must be > 0"):
            sapo(**_one(1.0, 1.0), **bad)


def test_dr_grpo_aggregation_needs_a_positive_budget():
    from alignlab.losses.policy import aggregate

    loss, mask = torch.tensor([[1.0, 2.0]]), torch.ones(1, 2)
    assert aggregate(loss, mask, "seq_mean_token_sum_norm", max_tokens=1) == (
        pytest.approx(3.0), 1)
    with pytest.raises(Exception, match="needs max_tokens"):
        aggregate(loss, mask, "seq_mean_token_sum_norm", max_tokens=0)


def test_rollout_correction_weights_are_zero_outside_the_mask():
    from alignlab.losses.rollout_correction import rollout_correction

    old = torch.tensor([[0.0, 0.0, 0.0]])
    weights, _ = rollout_correction(old, old - 0.5, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(weights, torch.tensor([[math.exp(0.5), math.exp(0.5), 0.0]]))


def test_explained_variance_of_small_returns():
    values = torch.zeros(1, 3)
    returns = torch.tensor([[0.1, 0.2, 0.3]])  # Var(R) = 0.01, well below 1
    _, m = VALUE_LOSSES.get("mse")(values, None, returns, torch.ones(1, 3))
    assert m["value_explained_variance"].item() == pytest.approx(0.0, abs=1e-5)  # V explains nothing


def test_sapo_accepts_a_negative_side_temperature_up_to_one():
    sapo = POLICY_LOSSES.get("sapo")
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # τ_neg = 0.5 ≤ 1 is a valid (slower-fading) temperature: ℓ = −(4/τ)·σ(τ(ρ − 1))·A, A = −1
    assert sapo(**_one(0.5, -1.0), tau_neg=0.5).per_token_loss.item() == pytest.approx(
        4 / 0.5 * sig(0.5 * -0.5))
    assert sapo(**_one(0.5, -1.0), tau_neg=1.0).per_token_loss.item() == pytest.approx(
        4 * sig(-0.5))


def test_rollout_correction_bounds_are_inclusive_and_may_meet():
    from alignlab.losses.rollout_correction import rollout_correction

    old = torch.zeros(1, 3, dtype=torch.float64)
    # ρ = (1, 2, 0.5) exactly: ρ = 1 lies on both bounds of the band [1, 1], which is kept
    rollout = old - torch.tensor([[0.0, math.log(2.0), math.log(0.5)]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    w, m = rollout_correction(old, rollout, mask, RolloutCorrection("mis", low=1.0, high=1.0))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert m["rollout_is/masked_fraction"].item() == pytest.approx(2 / 3)
    # TIS: a ratio on a bound is not counted as truncated; low = 0 means no floor
    _, m = rollout_correction(old, rollout, mask, RolloutCorrection("tis", low=1.0, high=1.0))
    assert m["rollout_is/truncated_fraction"].item() == pytest.approx(2 / 3)
    w, m = rollout_correction(old, rollout, mask, RolloutCorrection("mis", low=0.0, high=1.0))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64))
    assert m["rollout_is/masked_fraction"].item() == pytest.approx(1 / 3)
