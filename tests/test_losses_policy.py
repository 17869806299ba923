import math

import pytest
import torch

from alignlab.core.errors import ConfigError
from alignlab.losses.kl import kl_k3
from alignlab.losses.policy import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    cispo,
    gspo,
    num_items,
    ppo_clip,
    reinforce,
    sapo,
)
from alignlab.losses.rollout_correction import RolloutCorrection


def leaf(values):
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def test_ppo_at_ratio_one_equals_reinforce_surrogate():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([[0.5, 0.5, 0.0], [-2.0, 1.0, 3.0]])
    lp_ppo = leaf([[-1.0, -2.0, 0.0], [-0.5, -0.1, -3.0]])
    lp_pg = lp_ppo.detach().clone().requires_grad_(True)
    out = ppo_clip(lp_ppo, lp_ppo.detach(), adv, mask)
    assert torch.allclose(out.per_token_loss, -adv * mask)
    out.per_token_loss.sum().backward()
    reinforce(lp_pg, adv, mask).per_token_loss.sum().backward()
    assert torch.allclose(lp_ppo.grad, lp_pg.grad)
    assert torch.allclose(lp_ppo.grad, -adv * mask)
    assert float(out.metrics["clip_fraction"]) == 0.0
    assert float(out.metrics["ratio_mean"]) == pytest.approx(1.0)
    assert float(out.metrics["approx_kl"]) == pytest.approx(0.0)


def ratio_case(ratio: float, advantage: float, **kwargs):
    old = torch.tensor([[-1.0]])
    lp = (old + math.log(ratio)).requires_grad_(True)
    out = ppo_clip(lp, old, torch.tensor([[advantage]]), torch.tensor([[1]]), **kwargs)
    out.per_token_loss.sum().backward()
    return float(out.per_token_loss.detach()), float(lp.grad), out.metrics


def test_clipping_above_one_plus_eps_with_positive_advantage_has_no_gradient():
    loss, grad, metrics = ratio_case(1.5, 2.0, clip_eps_low=0.2)
    assert loss == pytest.approx(-2.0 * 1.2)
    assert grad == 0.0
    assert float(metrics["clip_fraction"]) == 1.0 and float(metrics["clip_fraction_high"]) == 1.0
    # below 1 − ε with a negative advantage: clipped too
    loss, grad, metrics = ratio_case(0.7, -1.0, clip_eps_low=0.2)
    assert loss == pytest.approx(0.8) and grad == 0.0
    assert float(metrics["clip_fraction_low"]) == 1.0
    # the pessimistic side is never clipped: ratio 1.5 with A < 0 keeps its gradient
    loss, grad, _ = ratio_case(1.5, -1.0, clip_eps_low=0.2)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5)


def test_clip_higher_is_asymmetric():
    # ratio 1.25, A > 0: clipped with ε = 0.2, not with DAPO's ε_high = 0.28
    _, grad_sym, _ = ratio_case(1.25, 1.0, clip_eps_low=0.2)
    loss, grad_high, _ = ratio_case(1.25, 1.0, clip_eps_low=0.2, clip_eps_high=0.28)
    assert grad_sym == 0.0
    assert loss == pytest.approx(-1.25) and grad_high == pytest.approx(-1.25)
    # the low side still clips at 1 − ε_low = 0.8
    loss, grad, _ = ratio_case(0.75, -1.0, clip_eps_low=0.2, clip_eps_high=0.28)
    assert loss == pytest.approx(0.8) and grad == 0.0


def test_dual_clip_caps_negative_advantage_loss():
    loss, grad, metrics = ratio_case(math.exp(2.0), -1.0, dual_clip_c=3.0)
    assert loss == pytest.approx(3.0) and grad == 0.0
    assert float(metrics["dual_clip_fraction"]) == 1.0
    loss, grad, _ = ratio_case(2.0, -1.0, dual_clip_c=3.0)  # below the cap: ordinary PPO
    assert loss == pytest.approx(2.0) and grad == pytest.approx(2.0)
    loss, grad, _ = ratio_case(1.5, 1.0, dual_clip_c=3.0)  # positive advantages are untouched
    assert loss == pytest.approx(-1.2) and grad == 0.0
    with pytest.raises(ConfigError, match="dual_clip_c"):
        ratio_case(1.0, -1.0, dual_clip_c=0.5)


def test_gspo_sequence_ratio_value_and_gradient():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    delta = torch.tensor([[0.3, -0.1, 0.1, 0.0], [0.05, -0.05, 0.0, 0.0]])
    adv_seq = torch.tensor([2.0, -1.0])
    adv = adv_seq[:, None] * mask
    lp = (old + delta).requires_grad_(True)
    out = gspo(lp, old, adv, mask, clip_eps_low=1.0, clip_eps_high=1.0)
    s = torch.exp(torch.tensor([0.3 / 3, 0.0]))  # exp(mean token log-ratio) per sequence
    assert torch.allclose(out.per_token_loss, -adv_seq[:, None] * s[:, None] * mask)
    loss_sum, n = aggregate(out.per_token_loss, mask, "seq_mean_token_mean")
    assert n == 2
    loss_sum.backward()
    # sequence-level GSPO written directly: J = Σ_i A_i exp(mean_t log ρ_it)
    lp2 = (old + delta).requires_grad_(True)
    seq_lr = ((lp2 - old) * mask).sum(-1) / mask.sum(-1)
    (-(adv_seq * seq_lr.exp()).sum()).backward()
    assert torch.allclose(lp.grad, lp2.grad, atol=1e-6)
    # with the paper's tiny ε, sequence 0 (s ≈ 1.105, A > 0) is clipped as a whole: no gradient
    lp3 = (old + delta).requires_grad_(True)
    out3 = gspo(lp3, old, adv, mask)
    out3.per_token_loss.sum().backward()
    assert torch.equal(lp3.grad[0], torch.zeros(4))
    assert float(out3.per_token_loss[0, 0].detach()) == pytest.approx(-2.0 * (1 + 4e-4))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_cispo_scales_the_gradient_by_the_clipped_weight_and_never_zeroes_it():
    # ratios 0.5, 1.5, 6: weights with the defaults (no floor, cap 5) are 0.5, 1.5, 5
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    lp = (old + torch.log(torch.tensor([[0.5, 1.5, 6.0]]))).requires_grad_(True)
    adv = torch.tensor([[2.0, 2.0, -1.0]])
    mask = torch.tensor([[1, 1, 1]])
    out = cispo(lp, old, adv, mask)
    weights = torch.tensor([[0.5, 1.5, 5.0]])
    assert torch.allclose(out.per_token_loss, -weights * adv * lp.detach())
    out.per_token_loss.sum().backward()
    assert torch.allclose(lp.grad, -weights * adv)  # PPO would give 0 on the 6× token
    assert float(out.metrics["clip_fraction"]) == pytest.approx(1 / 3)
    # both bounds set: clip(ρ, 1 − 0.2, 1 + 0.28) = [0.8, 1.28, 1.28]
    lp2 = lp.detach().clone().requires_grad_(True)
    cispo(lp2, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28).per_token_loss.sum().backward()
    assert torch.allclose(lp2.grad, -torch.tensor([[0.8, 1.28, 1.28]]) * adv)
    # no cap at all
    lp3 = lp.detach().clone().requires_grad_(True)
    cispo(lp3, old, adv, mask, clip_eps_high=None).per_token_loss.sum().backward()
    assert torch.allclose(lp3.grad, -torch.tensor([[0.5, 1.5, 6.0]]) * adv, rtol=1e-5)


def test_sapo_soft_gate_value_and_gradient():
    old = torch.tensor([[-1.0, -1.0]])
    ratio = [1.5, 0.5]
    lp = (old + torch.log(torch.tensor([ratio]))).requires_grad_(True)
    adv = torch.tensor([[2.0, -1.0]])  # τ_pos on the first token, τ_neg on the second
    out = sapo(lp, old, adv, torch.tensor([[1, 1]]), tau_pos=2.0, tau_neg=3.0)
    g1, g2 = sig(2.0 * 0.5), sig(3.0 * -0.5)
    assert out.per_token_loss[0].tolist() == pytest.approx([-2.0 * g1 * 4 / 2.0, 1.0 * g2 * 4 / 3.0])
    out.per_token_loss.sum().backward()
    # ∂ℓ/∂log π = −A·4σ(1−σ)·ρ (the gate's slope times dρ/dlog π)
    assert lp.grad[0].tolist() == pytest.approx([-2.0 * 4 * g1 * (1 - g1) * 1.5,
                                                 1.0 * 4 * g2 * (1 - g2) * 0.5], rel=1e-5)


def test_sapo_on_policy_gradient_is_the_grpo_gradient():
    lp = leaf([[-1.0, -2.0]])
    adv = torch.tensor([[1.5, -0.5]])
    out = sapo(lp, lp.detach(), adv, torch.tensor([[1, 1]]))
    # value 4/τ·½·(−A): τ_pos = 1 for A > 0, τ_neg = 1.05 for A ≤ 0 (the defaults)
    assert out.per_token_loss[0].tolist() == pytest.approx([-1.5 * 2.0, 0.5 * 2.0 / 1.05])
    out.per_token_loss.sum().backward()
    assert torch.allclose(lp.grad, -adv)
    with pytest.raises(ConfigError, match="temperatures"):
        sapo(lp, lp.detach(), adv, torch.tensor([[1, 1]]), tau_neg=0.0)


def test_rollout_correction_weights_the_policy_term_not_the_kl():
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    rollout = old - torch.log(torch.tensor([[0.25, 1.0, 3.0, 1.0]]))  # ρ = old/rollout
    mask = torch.tensor([[1, 1, 1, 0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    ref = torch.tensor([[-1.2, -0.8, -1.0, 0.0]])
    lp = old.clone().requires_grad_(True)
    out = ppo_clip(lp, old, adv, mask, rollout_logprobs=rollout, ref_logprobs=ref, kl_coef=0.1)
    w = torch.tensor([[0.25, 1.0, 2.0, 0.0]])  # TIS: min(ρ, 2), 0 on padding
    assert torch.allclose(out.per_token_loss, (-adv * w + 0.1 * kl_k3(old, ref)) * mask)
    assert float(out.metrics["rollout_is/truncated_fraction"]) == pytest.approx(1 / 3)
    assert float(out.metrics["rollout_is/abs_logp_diff_mean"]) == pytest.approx(
        (math.log(4) + 0 + math.log(3)) / 3)
    assert float(out.metrics["rollout_is/abs_logp_diff_max"]) == pytest.approx(math.log(4))
    assert float(out.metrics["rollout_is/ratio_mean"]) == pytest.approx((0.25 + 1 + 3) / 3)
    assert float(out.metrics["rollout_is/weight_mean"]) == pytest.approx((0.25 + 1 + 2) / 3)
    # MIS with the band [0.5, 2]: the 0.25× and 3× tokens are dropped, the others keep w = ρ
    mis = RolloutCorrection(mode="mis", low=0.5, high=2.0)
    out = reinforce(lp, adv, mask, old_logprobs=old, rollout_logprobs=rollout, rollout_correction=mis)
    assert torch.allclose(out.per_token_loss, -adv * torch.tensor([[0.0, 1.0, 0.0, 0.0]]) * old)
    assert float(out.metrics["rollout_is/masked_fraction"]) == pytest.approx(2 / 3)
    # TIS with a floor: clip(ρ, 0.5, 1.5)
    floor = RolloutCorrection(low=0.5, high=1.5)
    out = reinforce(lp, adv, mask, old_logprobs=old, rollout_logprobs=rollout, rollout_correction=floor)
    assert torch.allclose(out.per_token_loss, -adv * torch.tensor([[0.5, 1.0, 1.5, 0.0]]) * old)


def test_rollout_correction_sequence_level_and_on_policy_default():
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    rollout = old - torch.tensor([[0.2, 0.3, 9.0], [-0.5, -0.5, 0.0]])  # third token of row 0: padding
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.ones(2, 3)
    seq = RolloutCorrection(level="sequence", high=1.5)
    # row 0: ρ_seq = e^0.5 ≈ 1.65 → truncated at 1.5; row 1: e^−1 ≈ 0.37, kept
    lp = old.clone().requires_grad_(True)
    out = ppo_clip(lp, old, adv, mask, rollout_logprobs=rollout, rollout_correction=seq)
    expected = -torch.tensor([[1.5, 1.5, 0.0], [math.exp(-1), math.exp(-1), 0.0]])
    assert torch.allclose(out.per_token_loss, expected)
    assert float(out.metrics["rollout_is/truncated_fraction"]) == pytest.approx(0.5)
    # reinforce without old_logprobs: π_old is the current policy
    out = reinforce(lp, adv, mask, rollout_logprobs=rollout)
    assert torch.allclose(out.per_token_loss[0, :2], -torch.exp(torch.tensor([0.2, 0.3])) * old[0, :2])
    with pytest.raises(ConfigError, match="low <= high"):
        reinforce(lp, adv, mask, rollout_logprobs=rollout,
                  rollout_correction=RolloutCorrection(low=2.0, high=1.0))
    with pytest.raises(ConfigError, match="mode"):
        reinforce(lp, adv, mask, rollout_logprobs=rollout,
                  rollout_correction=RolloutCorrection(mode="clip"))


def test_reinforce_kl_and_entropy_terms():
    mask = torch.tensor([[1, 1, 0]])
    lp = leaf([[-1.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    adv = torch.tensor([[1.0, -1.0, 0.0]])
    entropy = torch.tensor([[2.0, 1.0, 7.0]])
    out = reinforce(lp, adv, mask, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k3",
                    entropy=entropy, entropy_coef=0.01)
    expected = (-adv * lp + 0.1 * kl_k3(lp, ref) - 0.01 * entropy) * mask
    assert torch.allclose(out.per_token_loss, expected)
    assert float(out.metrics["entropy"]) == pytest.approx(1.5)
    assert "kl" in out.metrics
    with pytest.raises(ValueError, match="ref_logprobs"):
        reinforce(lp, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        ppo_clip(lp, lp.detach(), adv, mask, entropy_coef=0.1)


def test_padding_garbage_does_not_leak():
    mask = torch.tensor([[1, 0]])
    lp = torch.tensor([[-1.0, float("nan")]])
    out = ppo_clip(lp, torch.tensor([[-1.0, 5.0]]), torch.tensor([[1.0, float("inf")]]), mask)
    assert out.per_token_loss.tolist() == [[-1.0, 0.0]]


# ---------------------------------------------------------------------------- aggregation

LENGTHS = [6, 1, 3, 5, 2]
PROMPT = [0, 2, 1, 0, 3]


def batch(rows: range, width: int):
    """Completion masks with uneven prompt offsets and lengths, padded to ``width``."""
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, i in enumerate(rows):
        mask[r, PROMPT[i]:PROMPT[i] + LENGTHS[i]] = 1
    return mask


def test_aggregation_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # an empty row is not a sequence
    assert aggregate(loss, mask, "token_mean") == (pytest.approx(10.0), 4)
    assert aggregate(loss, mask, "bnpo") == (pytest.approx(10.0), 4)
    assert aggregate(loss, mask, "seq_mean_token_mean") == (pytest.approx(2.0 + 4.0), 2)
    assert aggregate(loss, mask, "seq_mean_token_sum_norm", max_tokens=5) == (
        pytest.approx(10.0 / 5), 2)
    for mode in LOSS_AGGREGATIONS.names():
        kw = {"max_tokens": 5}
        assert num_items(mask, mode) == aggregate(loss, mask, mode, **kw)[1]
    with pytest.raises(ConfigError, match="max_tokens"):
        aggregate(loss, mask, "dr_grpo")
    with pytest.raises(ConfigError, match="allowed values"):
        aggregate(loss, mask, "sum")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm",
                                  "bnpo"])
def test_micro_batches_sum_to_full_batch_loss_and_gradient(mode):
    width = max(p + n for p, n in zip(PROMPT, LENGTHS))
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(5, width, generator=gen)
    old = logprobs + 0.3 * torch.randn(5, width, generator=gen)
    adv = torch.randn(5, width, generator=gen)
    kw = {"max_tokens": 8}

    def run(rows: range, pad_to: int):
        lp = logprobs[rows.start:rows.stop, :pad_to].clone().requires_grad_(True)
        mask = batch(rows, pad_to)
        out = ppo_clip(lp, old[rows.start:rows.stop, :pad_to], adv[rows.start:rows.stop, :pad_to],
                       mask, clip_eps_high=0.28)
        loss_sum, n = aggregate(out.per_token_loss, mask, mode, **kw)
        assert n == num_items(mask, mode)
        return lp, loss_sum, n

    lp_full, full_sum, full_n = run(range(0, 5), width)
    (full_sum / full_n).backward()
    # micro-batches, each padded only to its own widest row
    splits = [range(0, 2), range(2, 3), range(3, 5)]
    parts = [run(r, max(PROMPT[i] + LENGTHS[i] for i in r)) for r in splits]
    total_n = sum(n for _, _, n in parts)
    assert total_n == full_n
    micro_loss = sum(s / total_n for _, s, _ in parts)
    for _, s, _ in parts:
        (s / total_n).backward()
    assert torch.allclose(micro_loss, full_sum / full_n, atol=1e-6)
    for (lp, _, _), r in zip(parts, splits):
        w = lp.shape[1]
        assert torch.allclose(lp.grad, lp_full.grad[r.start:r.stop, :w], atol=1e-6)
        assert torch.equal(lp_full.grad[r.start:r.stop, w:], torch.zeros_like(
            lp_full.grad[r.start:r.stop, w:]))
    # the bug this contract prevents: averaging per-micro-batch means gives a different loss
    naive = sum(s / n for _, s, n in parts) / len(parts)
    if mode in ("token_mean", "bnpo", "seq_mean_token_mean"):
        assert not torch.allclose(naive, full_sum / full_n, atol=1e-4)


def test_policy_registry():
    assert {"ppo_clip", "ppo", "gspo", "cispo", "sapo", "reinforce", "vanilla_pg"} <= set(
        POLICY_LOSSES.names())
    assert {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "bnpo", "dapo",
            "grpo", "dr_grpo"} <= set(LOSS_AGGREGATIONS.names())
    mask = torch.tensor([[1, 1]])
    lp = torch.tensor([[-1.0, -2.0]])
    for name in POLICY_LOSSES.names():
        out = POLICY_LOSSES.get(name)(logprobs=lp, old_logprobs=lp, advantages=torch.ones(1, 2),
                                      mask=mask)
        assert out.per_token_loss.shape == (1, 2), name
