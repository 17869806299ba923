"""Hand-computed values and special cases of the reference-based paired losses."""

import math

import pytest
import torch

from alignlab.losses.preference import (
    PREFERENCE_LOSSES,
    MissingInputError,
    PreferenceInputs,
    update_group_weights,
)


def ls(x: float) -> float:
    """log σ(x)"""
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def pair(c=-3.0, r=-5.0, rc=-4.0, rr=-4.5, **extra):
    """Default: a = π_c − ref_c = 1, b = π_r − ref_r = −0.5, h = 1.5 (βh = 0.15 at β = 0.1)."""
    return PreferenceInputs(chosen_logps=t(c), rejected_logps=t(r), ref_chosen_logps=t(rc),
                            ref_rejected_logps=t(rr), **extra)


def loss(name, inputs, **kw):
    return PREFERENCE_LOSSES.get(name)(inputs, **kw).losses


@pytest.mark.parametrize("name, expected", [
    ("dpo", -ls(0.15)),
    ("sigmoid", -ls(0.15)),
    ("cdpo", -0.9 * ls(0.15) - 0.1 * ls(-0.15)),
    ("rdpo_robust", (-0.9 * ls(0.15) + 0.1 * ls(-0.15)) / 0.8),
    ("ipo", (1.5 - 5) ** 2),
    ("hinge", 1 - 0.15),
    ("exo_pair", sig(0.15) * (ls(0.15) - math.log(0.999)) + sig(-0.15) * (ls(-0.15) - math.log(1e-3))),
    ("nca_pair", -ls(0.1) - 0.5 * ls(-0.1) - 0.5 * ls(0.05)),
    ("bco_pair", -ls(0.1) - ls(0.05)),
    ("apo_zero", 1 - sig(0.1) + sig(-0.05)),
    ("apo_down", sig(0.1) + 1 - sig(0.15)),
    ("sppo_hard", (1 - 5) ** 2 + (-0.5 + 5) ** 2),
    ("dpop", -ls(0.15)),  # chosen above its reference: no penalty, plain DPO
    ("fdpo_reverse_kl", -ls(0.15)),
    ("fdpo_forward_kl", -ls(0.1 * (math.exp(0.5) - math.exp(-1)))),
    ("fdpo_js", -ls(0.1 * ((1 - math.log1p(math.e)) - (-0.5 - math.log1p(math.exp(-0.5)))))),
    ("fdpo_alpha", -ls(0.1 * (math.exp(0.25) - math.exp(-0.5)) / 0.5)),
])
def test_value_by_hand(name, expected):
    assert loss(name, pair(), beta=0.1).item() == pytest.approx(expected, rel=1e-9)


def test_label_smoothing_zero_is_dpo():
    dpo = loss("dpo", pair())
    assert torch.allclose(loss("cdpo", pair(), label_smoothing=0.0), dpo)
    assert torch.allclose(loss("rdpo_robust", pair(), label_smoothing=0.0), dpo)


def test_ipo_minimum_at_half_inverse_beta():
    beta = 0.25  # 1/(2β) = 2
    c = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)  # h = (−2+4) − 0 = 2
    inputs = PreferenceInputs(chosen_logps=c, rejected_logps=t(-4.0), ref_chosen_logps=t(-4.0),
                              ref_rejected_logps=t(-4.0))
    value = PREFERENCE_LOSSES.get("ipo")(inputs, beta=beta).losses.sum()
    value.backward()
    assert value.item() == pytest.approx(0.0) and c.grad.abs().item() < 1e-12
    wide = PreferenceInputs(chosen_logps=t(-1.0), rejected_logps=t(-4.0), ref_chosen_logps=t(-4.0),
                            ref_rejected_logps=t(-4.0))
    above = loss("ipo", wide, beta=beta)
    assert above.item() == pytest.approx(1.0)  # (3 − 2)²: IPO also pulls margins *down* to 1/(2β)


def test_ipo_length_normalize_divides_each_log_ratio_by_its_length():
    inputs = pair(chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]))
    # a/|y_c| − b/|y_r| = 1/4 + 0.5/2 = 0.5; 1/(2β) = 5
    result = PREFERENCE_LOSSES.get("ipo")(inputs, beta=0.1, length_normalize=True)
    assert result.losses.item() == pytest.approx((0.5 - 5) ** 2)
    assert result.chosen_rewards.item() == pytest.approx(0.1 * 0.25)
    assert result.rejected_rewards.item() == pytest.approx(0.1 * -0.25)  # β·b/|y_r|
    assert loss("ipo", inputs, beta=0.1).item() == pytest.approx((1.5 - 5) ** 2)  # default: sums
    with pytest.raises(MissingInputError, match="length_normalize"):
        loss("ipo", pair(), length_normalize=True)
    for one_side in ({"chosen_lengths": torch.tensor([4])}, {"rejected_lengths": torch.tensor([2])}):
        with pytest.raises(MissingInputError, match="length_normalize"):
            loss("ipo", pair(**one_side), length_normalize=True)


def test_hinge_zero_beyond_margin():
    assert loss("hinge", pair(), beta=1.0).item() == 0.0  # βh = 1.5 ≥ 1


def test_rdpo_length_value():
    inputs = pair(chosen_lengths=torch.tensor([10]), rejected_lengths=torch.tensor([4]))
    # Park et al. 2024: the logit is βh + α(|y_w| − |y_l|) = 0.15 + 0.01·6
    assert loss("rdpo_length", inputs, alpha=0.01).item() == pytest.approx(-ls(0.15 + 0.06))
    assert loss("rdpo_length", inputs, alpha=0.0).item() == pytest.approx(-ls(0.15))


@pytest.mark.parametrize("chosen_len, rejected_len, smaller", [(10, 4, True), (4, 10, False)])
def test_rdpo_length_gives_a_longer_chosen_answer_less_gradient_than_dpo(chosen_len, rejected_len,
                                                                        smaller):
    """The direction that a flipped sign would reverse: R-DPO exists to stop rewarding length."""
    def chosen_grad(name, **kw):
        c = t(-3.0).requires_grad_()
        inputs = PreferenceInputs(chosen_logps=c, rejected_logps=t(-5.0), ref_chosen_logps=t(-4.0),
                                  ref_rejected_logps=t(-4.5), chosen_lengths=torch.tensor([chosen_len]),
                                  rejected_lengths=torch.tensor([rejected_len]))
        PREFERENCE_LOSSES.get(name)(inputs, **kw).losses.sum().backward()
        return c.grad.abs().item()

    rdpo, dpo = chosen_grad("rdpo_length", beta=0.1, alpha=0.05), chosen_grad("dpo", beta=0.1)
    assert (rdpo < dpo) == smaller
    # |∂/∂π_c| = β·σ(−z): z = 0.15 ± 0.05·6
    assert rdpo == pytest.approx(0.1 * sig(-(0.15 + 0.05 * (chosen_len - rejected_len))))


def test_bco_pair_shift_and_mean_metric():
    result = PREFERENCE_LOSSES.get("bco_pair")(pair(), beta=0.1, reward_shift=0.02)
    assert result.losses.item() == pytest.approx(-ls(0.08) - ls(0.07))
    assert result.metrics["rewards/mean"].item() == pytest.approx((0.1 - 0.05) / 2)


def test_dpop_penalty_when_chosen_drops_below_reference():
    inputs = pair(c=-5.0, rc=-4.0)  # a = −1, b = −0.5, h = −0.5, penalty 1
    assert loss("dpop", inputs, lambda_=50.0).item() == pytest.approx(-ls(0.1 * (-0.5 - 50)))
    assert loss("dpop", inputs, lambda_=0.0).item() == pytest.approx(-ls(-0.05))


def test_discopop_blend():
    z, mix = 0.05 * 1.5, sig(0.05 * 1.5 / 0.05)
    assert loss("discopop", pair(), beta=0.05, tau=0.05).item() == pytest.approx(
        -ls(z) * (1 - mix) + math.exp(-z) * mix)


def test_aot_unpaired_on_pairs_sorts_chosen_and_rejected_log_ratios_apart():
    inputs = PreferenceInputs(chosen_logps=t(1.0, -1.0), rejected_logps=t(0.5, -2.0),
                              ref_chosen_logps=t(0.0, 0.0), ref_rejected_logps=t(0.0, 0.0))
    # sorted a = [−1, 1], sorted b = [−2, 0.5] → deltas [1, 0.5] (pairwise DPO would see [0.5, 1])
    assert torch.allclose(loss("aot_unpaired_on_pairs", inputs), t(-ls(0.1), -ls(0.05)))
    # the old name still computes the same formula
    assert torch.allclose(loss("aot_pair", inputs), t(-ls(0.1), -ls(0.05)))


def test_aot_paired_compares_sorted_policy_margins_with_sorted_reference_margins():
    inputs = PreferenceInputs(chosen_logps=t(-1.0, -2.0), rejected_logps=t(-4.0, -2.5),
                              ref_chosen_logps=t(-3.0, -1.0), ref_rejected_logps=t(-2.0, -3.0))
    # policy margins π_c − π_r = [3, 0.5] → sorted [0.5, 3]; reference margins [−1, 2] → [−1, 2]
    # quantile deltas [1.5, 1]; label smoothing ε = 0.2 mixes in the flipped label
    got = loss("aot_paired", inputs, beta=0.5, label_smoothing=0.2)
    expected = [-0.8 * ls(0.5 * d) - 0.2 * ls(-0.5 * d) for d in (1.5, 1.0)]
    assert torch.allclose(got, t(*expected))
    # pairing matters: the unpaired form reads a = [2, −1], b = [−2, 0.5] → deltas [1, 1.5]
    assert not torch.allclose(loss("aot_unpaired_on_pairs", inputs, beta=0.5),
                              loss("aot_paired", inputs, beta=0.5))


def test_fdpo_alpha_is_trls_coefficient_one_minus_alpha():
    a, b, alpha = 1.0, -0.5, 0.3  # pair()'s log-ratios
    trl_coef = 1 - alpha  # TRL: f'(u) = (u^(c−1) − 1)/(c − 1)
    trl_logit = 0.1 * (math.expm1((trl_coef - 1) * a) - math.expm1((trl_coef - 1) * b)) / (trl_coef - 1)
    assert loss("fdpo_alpha", pair(), alpha=alpha).item() == pytest.approx(-ls(trl_logit), rel=1e-9)


def test_fdpo_alpha_one_is_forward_kl():
    assert torch.allclose(loss("fdpo_alpha", pair(), alpha=1.0), loss("fdpo_forward_kl", pair()))


def test_mmpo_soft_target():
    p = sig(2.0)
    value = loss("mmpo", pair(margin=t(2.0)), gamma=1.0).item()
    assert value == pytest.approx(-p * ls(0.15) - (1 - p) * ls(-0.15))
    # a huge margin is a hard label: DPO
    assert loss("margin_matching", pair(margin=t(100.0))).item() == pytest.approx(-ls(0.15))


def test_dpo_ties_rao_kupper():
    untied = loss("dpo_ties", pair(ties=torch.tensor([False])), log_theta=1.0).item()
    tied = loss("dpo_ties", pair(ties=torch.tensor([True])), log_theta=1.0).item()
    assert untied == pytest.approx(-ls(0.15 - 1))
    assert tied == pytest.approx(-(math.log(math.e**2 - 1) + ls(0.15 - 1) + ls(-0.15 - 1)))
    # win + lose + tie probabilities sum to one
    assert sig(0.15 - 1) + sig(-0.15 - 1) + math.exp(-tied) == pytest.approx(1.0)


def test_wpo_weights_by_policy_probability():
    inputs = pair(chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([5]))
    assert loss("wpo", inputs).item() == pytest.approx(math.exp(-1.5 - 1.0) * -ls(0.15))


def test_sparse_po_unit_weights_is_dpo_and_weights_apply():
    tok = dict(chosen_token_logps=t(-1.0, -2.0, -9.0)[None],
               rejected_token_logps=t(-2.0, -3.0, -9.0)[None],
               ref_chosen_token_logps=t(-1.5, -1.5, 0.0)[None],
               ref_rejected_token_logps=t(-2.0, -2.0, 0.0)[None],
               chosen_mask=torch.tensor([[1, 1, 0]]), rejected_mask=torch.tensor([[1, 1, 0]]))
    # a = 0.5 − 0.5 = 0, b = 0 − 1 = −1, h = 1
    assert loss("sparse_po", PreferenceInputs(**tok)).item() == pytest.approx(-ls(0.1))
    weighted = PreferenceInputs(**tok, chosen_token_weights=t(2.0, 0.0, 5.0)[None],
                                rejected_token_weights=t(1.0, 1.0, 5.0)[None])
    assert loss("sparse_po", weighted).item() == pytest.approx(-ls(0.1 * (1.0 + 1.0)))


def test_mrpo_mixture_clip_and_single_reference():
    multi = PreferenceInputs(chosen_logps=t(-3.0), rejected_logps=t(-5.0),
                             ref_chosen_logps_multi=t(-4.0, -2.0)[None],
                             ref_rejected_logps_multi=t(-4.5, -3.5)[None])
    assert loss("mrpo", multi).item() == pytest.approx(-ls(0.1))  # ref_c = −3, ref_r = −4, h = 1
    assert loss("mrpo", multi, clip=0.5).item() == pytest.approx(-ls(0.15))  # −3.75, −4.25
    assert loss("mrpo", multi, ref_weights=[1.0, 0.0]).item() == pytest.approx(-ls(0.15))
    single = PreferenceInputs(chosen_logps=t(-3.0), rejected_logps=t(-5.0),
                              ref_chosen_logps_multi=t(-4.0)[None],
                              ref_rejected_logps_multi=t(-4.5)[None])
    assert torch.allclose(loss("mrpo", single), loss("dpo", pair()))


def test_group_robust_uniform_is_dpo_and_weights_scale():
    inputs = PreferenceInputs(chosen_logps=t(-3.0, -2.0), rejected_logps=t(-5.0, -2.0),
                              ref_chosen_logps=t(-4.0, -2.0), ref_rejected_logps=t(-4.5, -2.0),
                              groups=torch.tensor([0, 1]))
    dpo = loss("dpo", inputs)
    assert torch.allclose(loss("group_robust_dpo", inputs), dpo)
    weighted = loss("group_robust_dpo", inputs, group_weights=t(3.0, 1.0))
    assert torch.allclose(weighted, t(2 * 0.75, 2 * 0.25) * dpo)
    losses = PREFERENCE_LOSSES.get("group_robust_dpo")(inputs).metrics["group/losses"]
    alpha = update_group_weights(t(0.5, 0.5), losses, step_size=1.0)
    assert alpha.sum().item() == pytest.approx(1.0) and alpha[1] > alpha[0]  # group 1 has h = 0


def test_sigmoid_norm_compares_per_token_log_ratios():
    inputs = pair(chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]))
    # a/|y_c| − b/|y_r| = 1/4 − (−0.5)/2 = 0.5
    result = PREFERENCE_LOSSES.get("sigmoid_norm")(inputs, beta=2.0)
    assert result.losses.item() == pytest.approx(-ls(2.0 * 0.5))
    assert result.chosen_rewards.item() == pytest.approx(2.0 * 0.25)
    assert result.rejected_rewards.item() == pytest.approx(2.0 * -0.25)
    assert loss("sigmoid_norm", inputs).item() == pytest.approx(-ls(5.0 * 0.5))  # Tülu 3's β


def ld_inputs():
    """Chosen 4 tokens, rejected 2 (padded to 4): l_p = 2, the chosen tail is tokens 3–4."""
    c = t(-1.0, -2.0, -3.0, -4.0)[None].requires_grad_()
    r = t(-2.0, -1.0, 0.0, 0.0)[None].requires_grad_()
    return PreferenceInputs(
        chosen_token_logps=c, rejected_token_logps=r,
        ref_chosen_token_logps=t(-1.5, -1.5, -2.0, -2.0)[None],
        ref_rejected_token_logps=t(-1.0, -1.0, 0.0, 0.0)[None],
        chosen_mask=torch.tensor([[1, 1, 1, 1]]), rejected_mask=torch.tensor([[1, 1, 0, 0]]))


def test_ld_dpo_down_weights_the_longer_answers_tail():
    inputs = ld_inputs()
    # chosen per-token log-ratios [0.5, −0.5 | −1, −2]: shared 0, tail −3; rejected [−1, 0]: −1
    result = PREFERENCE_LOSSES.get("ld_dpo")(inputs, beta=0.5, alpha=0.2)
    a, b = 0.0 + 0.2 * -3.0, -1.0
    assert result.losses.item() == pytest.approx(-ls(0.5 * (a - b)))
    assert result.chosen_rewards.item() == pytest.approx(0.5 * a)
    result.losses.sum().backward()
    g = -0.5 * sig(-0.5 * (a - b))  # ∂loss/∂(log-ratio sum)
    assert inputs.chosen_token_logps.grad[0].tolist() == pytest.approx([g, g, 0.2 * g, 0.2 * g])
    assert inputs.rejected_token_logps.grad[0].tolist() == pytest.approx([-g, -g, 0.0, 0.0])
    # the default α = 0.5, and α = 1 is DPO on the sums
    assert loss("ld_dpo", ld_inputs()).item() == pytest.approx(-ls(0.1 * (0.5 * -3.0 + 1.0)))
    assert loss("ld_dpo", ld_inputs(), alpha=1.0).item() == pytest.approx(-ls(0.1 * (-3.0 + 1.0)))
