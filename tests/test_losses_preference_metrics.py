"""Every metric the preference losses log, and every non-default hyper-parameter, on small
hand-made batches (values computed by hand in the comments). Written against the survivors of
``tools/mutate.py``: a metric that is only checked for its sign, or an option only ever passed
at its default, lets wrong code through."""

import dataclasses
import math

import pytest
import torch

from alignlab.losses.preference import PREFERENCE_LOSSES, PreferenceInputs, combine_losses


def ls(x: float) -> float:
    """log σ(x)"""
    return -math.log1p(math.exp(-x))


def smoothed(z: float, eps: float) -> float:
    """−(1−ε)·log σ(z) − ε·log σ(−z)"""
    return -(1 - eps) * ls(z) - eps * ls(-z)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def run(name, inputs, **kw):
    return PREFERENCE_LOSSES.get(name)(inputs, **kw)


def three_pairs(**extra):
    """a = π_c − ref_c = (3, −2, 5), b = π_r − ref_r = (1, 4, −2); two of three pairs ordered
    right. At β = 0.1 the rewards are (0.3, −0.2, 0.5) and (0.1, 0.4, −0.2)."""
    return PreferenceInputs(chosen_logps=t(-7, -12, -5), rejected_logps=t(-9, -6, -12),
                            ref_chosen_logps=t(-10, -10, -10), ref_rejected_logps=t(-10, -10, -10),
                            **extra)


# ---- paired reward metrics ------------------------------------------------------------------

def test_paired_reward_metrics_are_batch_means():
    m = run("dpo", three_pairs(), beta=0.1).metrics
    assert m["rewards/chosen"].item() == pytest.approx(0.2)
    assert m["rewards/rejected"].item() == pytest.approx(0.1)  # a mean: the sum is 0.3
    assert m["rewards/margins"].item() == pytest.approx((0.2 - 0.6 + 0.7) / 3)
    assert m["rewards/accuracies"].item() == pytest.approx(2 / 3)  # a mean, not a count


def test_reward_accuracy_is_strict_a_tie_is_not_right():
    inputs = PreferenceInputs(chosen_logps=t(-1, -2), rejected_logps=t(-1, -3),
                              ref_chosen_logps=t(0, 0), ref_rejected_logps=t(0, 0))
    assert run("dpo", inputs).metrics["rewards/accuracies"].item() == pytest.approx(0.5)


def test_listwise_reward_metrics_use_the_best_and_worst_scored_item():
    inputs = PreferenceInputs(list_logps=t([1.0, 3.0, 2.0], [0.0, -1.0, 5.0]).requires_grad_(),
                              ref_list_logps=torch.zeros(2, 3, dtype=torch.float64),
                              scores=t([2.0, 0.0, 1.0], [0.0, 9.0, 1.0]),
                              list_mask=torch.tensor([[True, True, True], [True, False, True]]))
    r = run("lipo_lambda", inputs, beta=0.5)
    # best/worst by score: row 0 items 0/1 → rewards 0.5/1.5; row 1 (item 1 masked) items 2/0
    torch.testing.assert_close(r.chosen_rewards, t(0.5, 2.5))
    torch.testing.assert_close(r.rejected_rewards, t(1.5, 0.0))
    assert not r.chosen_rewards.requires_grad and r.losses.requires_grad
    m = r.metrics
    assert m["rewards/chosen"].item() == pytest.approx(1.5)
    assert m["rewards/rejected"].item() == pytest.approx(0.75)
    assert m["rewards/margins"].item() == pytest.approx((-1.0 + 2.5) / 2)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["lipo/pairs"].item() == pytest.approx((3 + 1) / 2)


def test_unpaired_reward_metrics_split_by_label():
    inputs = PreferenceInputs(logps=t(-1, -2, -3.5, -4), ref_logps=t(-2, -2, -2, -2),
                              labels=torch.tensor([True, False, True, False]), kl_ref=0.2)
    r = run("kto", inputs, beta=0.5)
    # r = (1, 0, −1.5, −2), rewards β·r = (0.5, 0, −0.75, −1)
    torch.testing.assert_close(r.chosen_rewards, t(0.5, -0.75))
    torch.testing.assert_close(r.rejected_rewards, t(0.0, -1.0))
    m = r.metrics
    assert m["rewards/mean"].item() == pytest.approx(-1.25 / 4)
    assert m["rewards/chosen"].item() == pytest.approx(-0.125)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["kl"].item() == pytest.approx(0.2)
    negative = dataclasses.replace(inputs, kl_ref=-0.3)  # a KL estimate below 0 is clamped
    assert run("kto", negative).metrics["kl"].item() == 0.0
    aot = run("aot_unpaired", inputs, beta=0.5)
    torch.testing.assert_close(aot.chosen_rewards, t(0.5, -0.75))
    only_good = PreferenceInputs(logps=t(-1.0), ref_logps=t(-2.0), labels=torch.tensor([True]))
    assert "rewards/rejected" not in run("kto", only_good).metrics
    only_bad = PreferenceInputs(logps=t(-1.0), ref_logps=t(-2.0), labels=torch.tensor([False]))
    assert "rewards/chosen" not in run("kto", only_bad).metrics


# ---- sparse_po with different chosen and rejected masks ----------------------------------------

def _tokens(**weights):
    # chosen: π − ref = (0.5, 0.5, −1.5), mask (1, 1, 0) → a = 1; rejected: π − ref = (−1, 0, −3),
    # mask (1, 1, 1) → b = −4. Each mask used for the other side would give a = −0.5, b = −1.
    return PreferenceInputs(
        chosen_token_logps=t([-1.0, -2.0, -3.0]), ref_chosen_token_logps=t([-1.5, -2.5, -1.5]),
        rejected_token_logps=t([-2.0, -1.0, -4.0]), ref_rejected_token_logps=t([-1.0, -1.0, -1.0]),
        chosen_mask=torch.tensor([[1, 1, 0]]), rejected_mask=torch.tensor([[1, 1, 1]]), **weights)


def test_sparse_po_masks_each_side_with_its_own_mask():
    r = run("sparse_po", _tokens(), beta=0.1)
    assert r.losses.item() == pytest.approx(-ls(0.1 * (1 - (-4))))
    assert r.chosen_rewards.item() == pytest.approx(0.1)
    assert r.rejected_rewards.item() == pytest.approx(-0.4)


def test_sparse_po_token_weights_apply_per_side():
    w = _tokens(chosen_token_weights=t([2.0, 1.0, 5.0]), rejected_token_weights=t([1.0, 0.5, 2.0]))
    r = run("sparse_po", w, beta=0.1)
    # a = 2·0.5 + 0.5 = 1.5 (the masked third token's weight is ignored); b = −1 + 0 − 6 = −7
    assert r.losses.item() == pytest.approx(-ls(0.1 * 8.5))
    assert r.chosen_rewards.item() == pytest.approx(0.15)
    assert r.rejected_rewards.item() == pytest.approx(-0.7)


def test_ld_dpo_shares_the_shorter_length_and_scales_the_tail():
    r = run("ld_dpo", _tokens(), beta=0.1, alpha=0.25)
    # l_p = min(2, 3) = 2: a = 0.5 + 0.5 = 1 (no tail), b = (−1 + 0) + 0.25·(−3) = −1.75
    assert r.losses.item() == pytest.approx(-ls(0.1 * 2.75))
    assert r.rejected_rewards.item() == pytest.approx(-0.175)


# ---- label_smoothing (and the other non-default options) of every loss that takes it -----------

def test_label_smoothing_of_reference_losses():
    # pair: a = 3, b = 1 → βh = 0.2 at β = 0.1
    one = PreferenceInputs(chosen_logps=t(-7.0), rejected_logps=t(-9.0), ref_chosen_logps=t(-10.0),
                           ref_rejected_logps=t(-10.0))
    for name in ("dpo", "cdpo", "aot_paired", "aot_unpaired_on_pairs", "aot_pair"):
        got = run(name, one, beta=0.1, label_smoothing=0.2).losses.item()
        assert got == pytest.approx(smoothed(0.2, 0.2)), name
    assert run("cdpo", one, beta=0.1).losses.item() == pytest.approx(smoothed(0.2, 0.1))


def test_aot_unpaired_on_pairs_sorts_each_side_and_smooths():
    inputs = three_pairs()  # sorted a = (−2, 3, 5), sorted b = (−2, 1, 4) → δ = (0, 2, 1)
    got = run("aot_unpaired_on_pairs", inputs, beta=0.5, label_smoothing=0.1).losses
    torch.testing.assert_close(got, t(*[smoothed(0.5 * d, 0.1) for d in (0, 2, 1)]))


@pytest.mark.parametrize("good, bad, deltas", [
    ((1.0, 3.0), (0.5, -1.0), (2.0, 2.5)),  # equal counts: sorted against sorted
    ((1.0, 4.0, 2.0), (0.0,), (2.0,)),  # unequal: both at the mid-quantile q = 0.5
    ((0.0,), (1.0, 3.0, 2.0, 6.0), (-2.5,)),  # q = 0.5 of (1, 2, 3, 6) interpolates to 2.5
])
def test_aot_unpaired_label_smoothing_and_quantiles(good, bad, deltas):
    logps = t(*good, *bad)
    labels = torch.tensor([True] * len(good) + [False] * len(bad))
    inputs = PreferenceInputs(logps=logps, ref_logps=torch.zeros_like(logps), labels=labels)
    got = run("aot_unpaired", inputs, beta=0.5, label_smoothing=0.3).losses
    torch.testing.assert_close(got, t(*[smoothed(0.5 * d, 0.3) for d in deltas]))


def test_simpo_and_cpo_label_smoothing_and_options():
    inputs = PreferenceInputs(chosen_logps=t(-4.0), rejected_logps=t(-9.0), chosen_lengths=t(2.0),
                              rejected_lengths=t(3.0))
    # simpo: β·(−2) − β·(−3) − γ = 2 − 0.5 = 1.5 at β = 2, γ = 0.5
    r = run("simpo", inputs, beta=2.0, gamma=0.5, label_smoothing=0.1)
    assert r.losses.item() == pytest.approx(smoothed(1.5, 0.1))
    assert r.chosen_rewards.item() == pytest.approx(-4.0)
    assert r.rejected_rewards.item() == pytest.approx(-6.0)
    # cpo: β·(π_c − π_r) = 0.5, NLL = 4/2 = 2 weighted by α = 0.5
    r = run("cpo", inputs, beta=0.1, alpha=0.5, label_smoothing=0.1)
    assert r.losses.item() == pytest.approx(smoothed(0.5, 0.1) + 0.5 * 2.0)
    assert r.metrics["cpo/nll"].item() == pytest.approx(2.0)


# ---- loss-specific metrics ---------------------------------------------------------------------

def test_dpop_penalty_metric_and_lambda():
    # a = (3, −2, 5): only the second chosen fell below its reference, by 2
    r = run("dpop", three_pairs(), beta=0.1, lambda_=2.0)
    assert r.metrics["dpop/penalty"].item() == pytest.approx(2 / 3)
    assert r.losses[1].item() == pytest.approx(-ls(0.1 * (-6 - 2 * 2)))


def test_wpo_weight_metric():
    inputs = PreferenceInputs(chosen_logps=t(-2.0, -1.0), rejected_logps=t(-4.0, -3.0),
                              ref_chosen_logps=t(-2.0, -1.0), ref_rejected_logps=t(-4.0, -3.0),
                              chosen_lengths=t(2.0, 1.0), rejected_lengths=t(4.0, 3.0))
    w = (math.exp(-1 - 1), math.exp(-1 - 1))
    assert run("wpo", inputs).metrics["wpo/weight"].item() == pytest.approx(sum(w) / 2)


def test_ties_fraction_metric_and_log_theta():
    ties = torch.tensor([True, False, False])
    r = run("dpo_ties", three_pairs(ties=ties), beta=0.1, log_theta=0.5)
    assert r.metrics["ties/fraction"].item() == pytest.approx(1 / 3)
    assert r.losses[1].item() == pytest.approx(-ls(-0.6 - 0.5))
    d = 0.2
    tie = math.log(math.expm1(1.0)) + ls(d - 0.5) + ls(-d - 0.5)
    assert r.losses[0].item() == pytest.approx(-tie)


def test_orpo_metrics():
    # per-token log p: chosen (−0.5, 0 — a certain completion), rejected (−2, −1)
    inputs = PreferenceInputs(chosen_logps=t(-1.0, 0.0), rejected_logps=t(-6.0, -2.0),
                              chosen_lengths=t(2.0, 3.0), rejected_lengths=t(3.0, 2.0))

    def log_odds(pc, pr):  # log(1 − p) with p capped just below 1
        return (pc - pr) - (math.log1p(-math.exp(min(pc, -1e-6)))
                            - math.log1p(-math.exp(min(pr, -1e-6))))

    odds = [log_odds(-0.5, -2.0), log_odds(0.0, -1.0)]
    r = run("orpo", inputs, beta=0.25)
    assert r.metrics["orpo/log_odds_chosen"].item() == pytest.approx(sum(odds) / 2)
    assert r.metrics["orpo/log_odds_ratio"].item() == pytest.approx((ls(odds[0]) + ls(odds[1])) / 2)
    assert r.metrics["orpo/nll"].item() == pytest.approx(0.25)
    torch.testing.assert_close(r.losses, t(0.5 - 0.25 * ls(odds[0]), 0.0 - 0.25 * ls(odds[1])))
    torch.testing.assert_close(r.chosen_rewards, t(-0.125, 0.0))
    torch.testing.assert_close(r.rejected_rewards, t(-0.5, -0.25))


def test_pro_nll_metric_and_sft_weight():
    inputs = PreferenceInputs(list_logps=t([-2.0, -6.0], [-6.0, -3.0]),
                              scores=t([1.0, 0.0], [0.0, 1.0]), list_lengths=t([2.0, 3.0], [3.0, 1.0]))
    r = run("pro", inputs, sft_weight=0.5, dynamic_temperature=False)
    # row 0: r = (−1, −2): −log softmax(r)_0 + 0.5·1; row 1, best first: r = (−3, −2)
    torch.testing.assert_close(r.losses, t(math.log1p(math.exp(-1.0)) + 0.5,
                                           math.log1p(math.exp(1.0)) + 0.5 * 3))
    assert r.metrics["pro/nll"].item() == pytest.approx((1.0 + 3.0) / 2)  # a mean over lists


def test_dro_residual_metric_and_labels():
    inputs = PreferenceInputs(logps=t(-1.0, -3.0), ref_logps=t(-2.0, -2.0), rewards=t(1.0, -1.0),
                              values=t(0.5, 0.5))
    r = run("dro_pointwise", inputs, beta=0.5)
    # residual = reward − V − β·r = (1 − 0.5 − 0.5, −1 − 0.5 + 0.5) = (0, −1)
    torch.testing.assert_close(r.losses, t(0.0, 0.5))
    assert r.metrics["dro/residual"].item() == pytest.approx(0.5)
    torch.testing.assert_close(r.chosen_rewards, t(0.5))  # reward above its value: desirable


def test_bco_pair_reward_mean_and_shift():
    r = run("bco_pair", three_pairs(), beta=0.1, reward_shift=0.1)
    assert r.metrics["rewards/mean"].item() == pytest.approx((0.6 + 0.3) / 6)
    assert r.losses[0].item() == pytest.approx(-ls(0.3 - 0.1) - ls(-(0.1 - 0.1)))


def test_group_losses_metric_is_the_mean_dpo_loss_per_group():
    groups = torch.tensor([0, 1, 1])
    r = run("group_robust_dpo", three_pairs(groups=groups), beta=0.1)
    dpo = [-ls(0.2), -ls(-0.6), -ls(0.7)]
    torch.testing.assert_close(r.metrics["group/losses"], t(dpo[0], (dpo[1] + dpo[2]) / 2))
    weighted = run("group_robust_dpo", three_pairs(groups=groups), beta=0.1,
                   group_weights=t(3.0, 1.0))
    torch.testing.assert_close(weighted.losses, t(2 * 0.75 * dpo[0], 2 * 0.25 * dpo[1],
                                                  2 * 0.25 * dpo[2]))


def test_combine_losses_prefixes_metrics_and_logs_unweighted_term_means():
    inputs = three_pairs(chosen_lengths=t(2.0, 4.0, 5.0), rejected_lengths=t(1.0, 1.0, 1.0))
    out = combine_losses({"dpo": 0.5, "sft": 2.0}, inputs, beta=0.1)
    dpo = run("dpo", inputs, beta=0.1)
    sft_mean = (7 / 2 + 12 / 4 + 5 / 5) / 3
    assert out.metrics["dpo/loss"].item() == pytest.approx(dpo.losses.mean().item())
    assert out.metrics["sft/loss"].item() == pytest.approx(sft_mean)
    assert out.metrics["dpo/rewards/accuracies"].item() == pytest.approx(2 / 3)
    torch.testing.assert_close(out.losses, 0.5 * dpo.losses + 2.0 * t(3.5, 3.0, 1.0))
    torch.testing.assert_close(out.chosen_rewards, dpo.chosen_rewards)


# ---- the shared machinery ------------------------------------------------------------------------

def test_paired_result_rewards_are_detached_and_need_both_sides():
    from alignlab.losses.preference.base import paired_result, smoothed_sigmoid_loss

    chosen = t(1.0, 2.0).requires_grad_()
    out = paired_result(chosen * 2, chosen * 3, chosen * 1)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert not out.metrics["rewards/margins"].requires_grad
    only_one = paired_result(chosen, chosen * 3, None)
    assert "rewards/chosen" not in only_one.metrics
    z = t(0.3, -2.0)
    torch.testing.assert_close(smoothed_sigmoid_loss(z), -torch.nn.functional.logsigmoid(z))


def test_empty_completions_count_as_one_token():
    inputs = PreferenceInputs(chosen_logps=t(-3.0, -4.0), chosen_lengths=t(0.0, 2.0))
    torch.testing.assert_close(run("sft", inputs).losses, t(3.0, 2.0))


def test_spec_defaults_and_missing_input_messages():
    from alignlab.losses.preference import MissingInputError, loss_spec

    assert loss_spec("dpo").defaults == {"beta": 0.1, "label_smoothing": 0.0}
    assert loss_spec("sft").defaults == {}
    no_ref = PreferenceInputs(chosen_logps=t(-1.0), rejected_logps=t(-2.0))
    with pytest.raises(MissingInputError, match="compute the reference log-probs") as err:
        run("dpo", no_ref)
    assert "given: chosen_logps, rejected_logps" in str(err.value)
    with pytest.raises(MissingInputError) as err:
        run("simpo", no_ref)
    assert "reference model" not in str(err.value) and "chosen_lengths" in str(err.value)


def test_combine_losses_keeps_the_first_loss_rewards():
    inputs = three_pairs(chosen_lengths=t(2.0, 4.0, 5.0), rejected_lengths=t(1.0, 1.0, 1.0))
    out = combine_losses({"dpo": 1.0, "simpo": 1.0}, inputs, beta=0.1)
    torch.testing.assert_close(out.chosen_rewards, run("dpo", inputs, beta=0.1).chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, run("dpo", inputs, beta=0.1).rejected_rewards)


def test_f_divergence_rewards_defaults_and_the_exp_cap():
    one = PreferenceInputs(chosen_logps=t(-7.0), rejected_logps=t(-9.0), ref_chosen_logps=t(-10.0),
                           ref_rejected_logps=t(-10.0))  # a = 3, b = 1
    r = run("fdpo_forward_kl", one, beta=0.5)
    assert r.chosen_rewards.item() == pytest.approx(-0.5 * math.exp(-3))
    assert r.rejected_rewards.item() == pytest.approx(-0.5 * math.exp(-1))
    assert run("fdpo_reverse_kl", one).losses.item() == pytest.approx(-ls(0.2))  # β = 0.1
    far = PreferenceInputs(chosen_logps=t(-100.0), rejected_logps=t(-9.0), ref_chosen_logps=t(0.0),
                           ref_rejected_logps=t(-10.0))  # a = −100: e^{−a} is capped at e^80
    assert run("fdpo_forward_kl", far, beta=1.0).chosen_rewards.item() == pytest.approx(
        -math.exp(80))


def test_f_divergence_js_and_alpha_defaults_rewards_and_bounds():
    one = PreferenceInputs(chosen_logps=t(-7.0), rejected_logps=t(-9.0), ref_chosen_logps=t(-10.0),
                           ref_rejected_logps=t(-10.0))  # a = 3, b = 1
    js = lambda x: x - math.log1p(math.exp(x))  # noqa: E731
    assert run("fdpo_js", one).losses.item() == pytest.approx(-ls(0.1 * (js(3) - js(1))))
    r = run("fdpo_alpha", one, beta=0.5, alpha=0.5)
    assert r.chosen_rewards.item() == pytest.approx(0.5 * (1 - math.exp(-1.5)) / 0.5)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        run("fdpo_alpha", one, alpha=0.0)


def test_lipo_lambda_weights_by_hand_on_three_items():
    s, psi = (1.0, 0.0, 2.0), (2.0, 1.0, 0.0)
    inputs = PreferenceInputs(list_logps=t(list(s)), ref_list_logps=t([0.0, 0.0, 0.0]),
                              scores=t(list(psi)))
    rank = {2: 1, 0: 2, 1: 3}  # by implicit reward, highest first
    gain = [2 ** p - 1 for p in psi]
    inv = {i: 1 / math.log2(1 + rank[i]) for i in range(3)}
    expected = sum(abs(gain[i] - gain[j]) * abs(inv[i] - inv[j]) * -ls(s[i] - s[j])
                   for i in range(3) for j in range(3) if psi[i] > psi[j])
    r = run("lipo_lambda", inputs, beta=1.0)
    assert r.losses.item() == pytest.approx(expected)
    tied = PreferenceInputs(list_logps=t([1.0, 1.0]), ref_list_logps=t([0.0, 0.0]),
                            scores=t([1.0, 0.0]))
    assert run("lipo_lambda", tied).metrics["rewards/accuracies"].item() == 0.0


def test_pro_dynamic_temperature_ignores_padding_items():
    inputs = PreferenceInputs(list_logps=t([-1.0, -2.0, -9.0]), scores=t([3.0, 2.5, 0.0]),
                              list_lengths=t([1.0, 1.0, 1.0]),
                              list_mask=torch.tensor([[True, True, False]]))
    # 1/T = score gaps (0.5 to the only real rival; the top item's is their max, 0.5)
    r = run("pro", inputs, sft_weight=0.0)
    assert r.losses.item() == pytest.approx(math.log1p(math.exp(-0.5)))


def test_spo_degree_temperature_and_padding():
    inputs = PreferenceInputs(list_logps=t([1.0, 0.0, 2.0, 7.0]), ref_list_logps=t([0.0] * 4),
                              scores=t([2.0, 1.0, 0.0, 5.0]),
                              list_mask=torch.tensor([[True, True, True, False]]))
    target = torch.softmax(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), -1)
    log_probs = torch.log_softmax(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), -1)
    r = run("spo_degree", inputs, beta=1.0, temperature=2.0)
    assert r.losses.item() == pytest.approx(-(target * log_probs).sum().item())


def test_rdpo_length_default_alpha():
    inputs = three_pairs(chosen_lengths=t(2.0, 4.0, 5.0), rejected_lengths=t(1.0, 1.0, 8.0))
    # βh + α·(|y_c| − |y_r|) with the default α = 0.01
    expected = [-ls(0.2 + 0.01), -ls(-0.6 + 0.03), -ls(0.7 - 0.03)]
    torch.testing.assert_close(run("rdpo_length", inputs).losses, t(*expected))


def test_rdpo_robust_refuses_half_of_the_labels_flipped():
    with pytest.raises(ValueError, match=r"must be in \[0, 0.5\)"):
        run("rdpo_robust", three_pairs(), label_smoothing=0.5)


def test_cpo_nll_metric_is_a_mean_over_pairs():
    inputs = PreferenceInputs(chosen_logps=t(-4.0, -3.0), rejected_logps=t(-9.0, -1.0),
                              chosen_lengths=t(2.0, 1.0))
    assert run("cpo", inputs).metrics["cpo/nll"].item() == pytest.approx((2.0 + 3.0) / 2)


def test_dro_labels_a_reward_equal_to_its_value_undesirable():
    inputs = PreferenceInputs(logps=t(-1.0, -1.0), ref_logps=t(-1.0, -1.0), rewards=t(0.5, 0.7),
                              values=t(0.5, 0.5))
    r = run("dro_pointwise", inputs)
    assert r.chosen_rewards.numel() == 1 and r.rejected_rewards.numel() == 1


def test_mrpo_weights_clip_and_rewards():
    inputs = PreferenceInputs(chosen_logps=t(-1.0), rejected_logps=t(-4.0),
                              ref_chosen_logps_multi=t([-2.0, -4.0]),
                              ref_rejected_logps_multi=t([-2.0, -2.0]))
    r = run("mrpo", inputs, beta=0.1, ref_weights=[1.0, 3.0], clip=1.0)
    # ref_c: the second reference clipped to −2 − 1 = −3, mixed ¼·(−2) + ¾·(−3) = −2.75 → a = 1.75
    assert r.chosen_rewards.item() == pytest.approx(0.175)
    assert r.rejected_rewards.item() == pytest.approx(-0.2)  # b = −4 − (−2)
    assert r.losses.item() == pytest.approx(-ls(0.1 * 3.75))


def test_group_weight_update_default_step():
    from alignlab.losses.preference import update_group_weights

    got = update_group_weights(t(0.5, 0.5), t(1.0, 0.0))
    e = math.exp(0.01)
    torch.testing.assert_close(got, t(e / (1 + e), 1 / (1 + e)))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_unpaired_losses_with_non_default_weights_and_shift():
    inputs = PreferenceInputs(logps=t(-1.0, -3.0), ref_logps=t(-2.0, -2.0),
                              labels=torch.tensor([True, False]), kl_ref=0.5)  # r = (1, −1)
    kto = run("kto", inputs, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5).losses
    torch.testing.assert_close(kto, t(2 * (1 - sig(0.25)), 0.5 * (1 - sig(0.75))))
    apo = run("apo_zero_unpaired", inputs, beta=0.5, desirable_weight=2.0,
              undesirable_weight=0.5).losses
    torch.testing.assert_close(apo, t(2 * (1 - sig(0.5)), 0.5 * sig(-0.5)))
    bco = run("bco", inputs, beta=0.5, reward_shift=0.2).losses
    torch.testing.assert_close(bco, t(-ls(0.3), -ls(0.7)))


def test_paired_losses_with_non_default_options():
    one = PreferenceInputs(chosen_logps=t(-7.0), rejected_logps=t(-9.0), ref_chosen_logps=t(-10.0),
                           ref_rejected_logps=t(-10.0), margin=t(2.0))  # a = 3, b = 1, βh = 0.2
    z = 0.2
    exo = sig(z) * (ls(z) - math.log(0.8)) + sig(-z) * (ls(-z) - math.log(0.2))
    assert run("exo_pair", one, label_smoothing=0.2).losses.item() == pytest.approx(exo)
    mix = sig(z / 0.5)
    assert run("discopop", one, beta=0.1, tau=0.5).losses.item() == pytest.approx(
        -ls(z) * (1 - mix) + math.exp(-z) * mix)
    target = sig(0.5 * 2.0)
    assert run("mmpo", one, gamma=0.5).losses.item() == pytest.approx(
        -target * ls(z) - (1 - target) * ls(-z))
    assert run("slic_hf", one, delta=3.0).losses.item() == pytest.approx(1.0)  # π_c − π_r = 2


def test_bounds_and_quantiles_of_two_or_more():
    with pytest.raises(ValueError, match="log_theta must be > 0"):
        run("dpo_ties", three_pairs(ties=torch.tensor([False, False, True])), log_theta=0.0)
    # 3 desirable, 2 undesirable: both read at q = (0.25, 0.75)
    logps = t(0.0, 2.0, 4.0, 0.0, 1.0)
    inputs = PreferenceInputs(logps=logps, ref_logps=torch.zeros_like(logps),
                              labels=torch.tensor([True, True, True, False, False]))
    # Q_D(0.25) = 1, Q_D(0.75) = 3; Q_U(0.25) = 0.25, Q_U(0.75) = 0.75
    got = run("aot_unpaired", inputs, beta=1.0).losses
    torch.testing.assert_close(got, t(-ls(0.75), -ls(2.25)))


def test_kto_keeps_the_dtype_of_its_log_probs():
    inputs = PreferenceInputs(logps=torch.tensor([-1.0], dtype=torch.bfloat16),
                              ref_logps=torch.tensor([-2.0], dtype=torch.bfloat16),
                              labels=torch.tensor([True]), kl_ref=0.3)
    assert run("kto", inputs).losses.dtype == torch.bfloat16


def test_group_losses_of_an_empty_group_are_zero():
    r = run("group_robust_dpo", three_pairs(groups=torch.tensor([0, 0, 1])),
            group_weights=t(1.0, 1.0, 1.0))
    assert r.metrics["group/losses"][2].item() == 0.0
