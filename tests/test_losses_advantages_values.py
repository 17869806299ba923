"""Advantage estimators and their masked statistics at the edges: empty masks, single
elements, constant inputs, and every non-default option, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.core.errors import ConfigError
from alignlab.losses import advantages as adv

M2 = torch.ones(1, 2)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_masked_statistics_at_the_edges():
    assert adv.masked_mean(t([1.0, 2.0]), t([0, 0])).item() == 0.0  # empty: 0, not NaN
    assert adv.masked_var(t([5.0, 2.0]), t([1, 0])).item() == 0.0  # one element: 0, not NaN
    assert adv.masked_var(t([1.0, 3.0]), M2).item() == pytest.approx(2.0)
    assert adv.masked_var(t([1.0, 3.0]), M2, unbiased=False).item() == pytest.approx(1.0)


def test_whiten_by_hand():
    x = t([1.0, 3.0, 7.0])
    mask = t([1, 1, 0])
    # mean 2, unbiased var 2
    s = 1 / (2 + 1e-8) ** 0.5
    torch.testing.assert_close(adv.whiten(x, mask), t([-s, s, 0.0]))
    torch.testing.assert_close(adv.whiten(x, mask, eps=1.0), t([-(3 ** -0.5), 3 ** -0.5, 0.0]))
    torch.testing.assert_close(adv.whiten(x, mask, shift_mean=False), t([2 - s, 2 + s, 0.0]))
    torch.testing.assert_close(adv.whiten(t([2.0, 2.0]), M2), t([0.0, 0.0]))  # constant: 0


def test_scores_to_token_rewards_with_dense_parts_and_empty_rows():
    mask = t([1, 1, 0], [0, 0, 0])
    dense = t([0.5, 0.25, 0.0], [1.0, 0.0, 0.0])
    got = adv.scores_to_token_rewards(torch.tensor([3.0, 5.0]), mask, dense)
    torch.testing.assert_close(got, t([0.5, 2.5, 0.0], [1.0, 0.0, 0.0]))
    plain = adv.scores_to_token_rewards(torch.tensor([3.0, 5.0]), mask)
    torch.testing.assert_close(plain, t([0.0, 3.0, 0.0], [0.0, 0.0, 0.0]))


def test_discounted_returns_and_gae_with_default_options():
    torch.testing.assert_close(adv.discounted_returns(t([1.0, 2.0]), M2), t([3.0, 2.0]))
    a, r = adv.gae(mask=M2, values=t([0.5, 1.0]), scores=torch.tensor([2.0]))
    # t=1: δ = 2 − 1 = 1; t=0: δ = 1.0 − 0.5 = 0.5, A = 0.5 + 0.95·1
    torch.testing.assert_close(a, t([1.45, 1.0]))
    torch.testing.assert_close(r, t([1.95, 2.0]))


SCORES = torch.tensor([1.0, 2.0, 4.0, 0.0])
MASK4 = torch.ones(4, 1)


@pytest.mark.parametrize("kwargs, std", [
    ({}, [0.5 ** 0.5] * 2 + [8 ** 0.5] * 2),
    ({"scale_rewards": True}, [0.5 ** 0.5] * 2 + [8 ** 0.5] * 2),
    ({"scale_rewards": "batch"}, [(8.75 / 3) ** 0.5] * 4),
])
def test_grpo_scaling_by_hand(kwargs, std):
    centred = torch.tensor([-0.5, 0.5, 2.0, -2.0])
    for eps in (1e-4, 0.5):
        extra = {} if eps == 1e-4 else {"eps": eps}
        got, returns = adv.grpo(mask=MASK4, scores=SCORES, group_size=2, **kwargs, **extra)
        torch.testing.assert_close(got[:, 0], centred / (torch.tensor(std) + eps))
        assert returns is None


def test_grpo_unscaled_variants_and_groups_of_one():
    centred = torch.tensor([-0.5, 0.5, 2.0, -2.0])
    for got in (adv.grpo(mask=MASK4, scores=SCORES, group_size=2, scale_rewards=False)[0],
                adv.grpo(mask=MASK4, scores=SCORES, group_size=2, scale_rewards="none")[0],
                adv.dr_grpo(mask=MASK4, scores=SCORES, group_size=2)[0]):
        torch.testing.assert_close(got[:, 0], centred)
    one = adv.grpo(mask=torch.ones(1, 2), scores=torch.tensor([3.0]), group_size=1,
                   scale_rewards="batch")[0]
    torch.testing.assert_close(one, torch.zeros(1, 2))
    ids = adv.grpo(mask=MASK4, scores=SCORES, group_ids=torch.tensor([7, 7, 3, 3]))[0]
    torch.testing.assert_close(ids, adv.grpo(mask=MASK4, scores=SCORES, group_size=2)[0])


def test_rloo_remax_reinforce_by_hand():
    mask = torch.ones(3, 1)
    s = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(adv.rloo(mask=mask, scores=s, group_size=3)[0][:, 0],
                               torch.tensor([-2.0, -0.5, 2.5]))
    torch.testing.assert_close(adv.remax(mask=mask, scores=s, baseline_scores=torch.ones(3))[0][:, 0],
                               torch.tensor([0.0, 1.0, 3.0]))
    torch.testing.assert_close(adv.reinforce(mask=mask, scores=s, baseline=True)[0][:, 0],
                               s - 7 / 3)
    torch.testing.assert_close(adv.reinforce(mask=mask, scores=s)[0][:, 0], s)


def test_reinforce_pp_passes_eps_and_gamma():
    a, returns = adv.reinforce_pp(mask=M2, rewards=t([1.0, 2.0]), eps=1.0)
    torch.testing.assert_close(returns, t([3.0, 2.0]))
    torch.testing.assert_close(a, t([0.5, -0.5]) / 1.5 ** 0.5)  # mean 2.5, unbiased var 0.5
    _, returns = adv.reinforce_pp(mask=M2, rewards=t([1.0, 2.0]), gamma=0.5)
    torch.testing.assert_close(returns, t([2.0, 2.0]))


@pytest.mark.parametrize("name", adv.ADVANTAGE_ESTIMATORS.names())
def test_every_estimator_refuses_a_misspelt_option(name):
    with pytest.raises(ConfigError, match="unknown argument"):
        adv.ADVANTAGE_ESTIMATORS.get(name)(mask=M2, scores=torch.tensor([1.0]), gamam=0.9)


def test_bad_shapes_and_group_sizes_are_refused():
    with pytest.raises(ValueError, match="scores must have shape"):
        adv.grpo(mask=MASK4, scores=torch.ones(4, 1), group_size=2)  # right length, wrong rank
    with pytest.raises(ValueError, match="scores must have shape"):
        adv.grpo(mask=MASK4, scores=torch.ones(3), group_size=1)
    with pytest.raises(ConfigError, match="group_size=0"):
        adv.grpo(mask=MASK4, scores=SCORES, group_size=0)
    with pytest.raises(ConfigError, match="at least 2 completions"):
        adv.rloo(mask=MASK4, scores=SCORES, group_size=1)


def test_rloo_with_groups_of_two():
    got = adv.rloo(mask=MASK4, scores=SCORES, group_size=2)[0][:, 0]
    torch.testing.assert_close(got, torch.tensor([-1.0, 1.0, 4.0, -4.0]))


def test_dense_rewards_of_another_dtype_come_back_float32():
    got = adv.scores_to_token_rewards(torch.tensor([3.0]), M2, dense=torch.tensor([[1.0, 0.5]],
                                                                                  dtype=torch.float64))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, t([1.0, 2.0]))


def test_kl_estimators_clamp_the_log_ratio():
    from alignlab.losses.kl import LOG_RATIO_CLAMP, kl_k3

    assert LOG_RATIO_CLAMP == 20.0
    got = kl_k3(torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([30.0, -30.0],
                                                                            dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([math.exp(20) - 21, math.exp(-20) + 19],
                                                 dtype=torch.float64))


def test_adaptive_kl_controller_bounds_and_clipped_error():
    for target, horizon in ((0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)):
        with pytest.raises(ConfigError, match="target and horizon must be > 0"):
            adv.AdaptiveKLController(0.1, target=target, horizon=horizon)
    ctl = adv.AdaptiveKLController(0.1, target=0.5, horizon=0.5)  # below 1 is allowed
    assert ctl.update(100.0, n_steps=1) == pytest.approx(0.1 * (1 + 0.2 * 2))  # error capped
    assert ctl.update(0.0, n_steps=1) == pytest.approx(0.14 * (1 - 0.2 * 2))  # and floored
    assert ctl.update(0.6, n_steps=1) == pytest.approx(0.084 * (1 + 0.2 * 2 * 1.0))
    fixed = adv.FixedKLController(0.3)
    assert fixed.update(5.0, 10) == 0.3
    fixed.load_state_dict(ctl.state_dict())
    assert fixed.kl_coef == ctl.kl_coef
