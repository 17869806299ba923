import math

import pytest
import torch

from alignlab.core.errors import ConfigError
from alignlab.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    gae,
    grpo,
    kl_shaped_rewards,
    masked_mean,
    masked_var,
    reinforce,
    reinforce_pp,
    remax,
    rloo,
    whiten,
)


def close(actual, expected, tol=1e-5):
    assert torch.allclose(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol), \
        (actual, expected)


def test_gae_by_hand_on_three_tokens():
    # γ = 0.9, λ = 0.8, so γλ = 0.72. Row 0: completion at t = 0..2, padding at t = 3 (whose
    # value 9.0 must be ignored). Row 1: the same completion after a one-token prompt.
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0], [9.0, 0.5, 0.6, 0.7]])
    # t=2: δ = 1 + 0.9·0   − 0.7 = 0.3    A = 0.3
    # t=1: δ = 0 + 0.9·0.7 − 0.6 = 0.03   A = 0.03 + 0.72·0.3   = 0.246
    # t=0: δ = 0 + 0.9·0.6 − 0.5 = 0.04   A = 0.04 + 0.72·0.246 = 0.21712
    adv, ret = gae(mask=mask, rewards=rewards, values=values, gamma=0.9, lam=0.8)
    close(adv, [[0.21712, 0.246, 0.3, 0.0], [0.0, 0.21712, 0.246, 0.3]])
    close(ret, [[0.71712, 0.846, 1.0, 0.0], [0.0, 0.71712, 0.846, 1.0]])
    # A sequence score lands on the last completion token.
    adv2, _ = gae(mask=mask, scores=torch.tensor([1.0, 1.0]), values=values, gamma=0.9, lam=0.8)
    close(adv2, adv)


def test_gae_with_gamma_lambda_one_is_return_minus_value():
    mask = torch.tensor([[1, 1, 1]])
    rewards = torch.tensor([[0.1, 0.2, 0.3]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, ret = gae(mask=mask, rewards=rewards, values=values, gamma=1.0, lam=1.0)
    close(ret, [[0.6, 0.5, 0.3]])
    close(adv, [[-0.4, -1.5, -2.7]])


SCORES = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # groups {1,2,3} and {0,0,6}
MASK = torch.tensor([[1, 1, 0]] * 6)


def test_grpo_two_groups():
    # group 1: mean 2, unbiased std 1; group 2: mean 2, std sqrt((4+4+16)/2) = sqrt(12)
    adv, ret = grpo(mask=MASK, scores=SCORES, group_size=3, eps=0.0)
    assert ret is None
    s12 = math.sqrt(12)
    close(adv[:, 0], [-1.0, 0.0, 1.0, -2 / s12, -2 / s12, 4 / s12])
    assert torch.equal(adv[:, 2], torch.zeros(6))
    assert torch.equal(adv[:, 0], adv[:, 1])
    # Dr. GRPO: no std scaling.
    adv_none, _ = grpo(mask=MASK, scores=SCORES, group_size=3, scale_rewards="none")
    close(adv_none[:, 0], [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])
    assert torch.equal(grpo(mask=MASK, scores=SCORES, group_size=3, scale_rewards=False)[0],
                       adv_none)
    assert torch.equal(ADVANTAGE_ESTIMATORS.get("dr_grpo")(mask=MASK, scores=SCORES,
                                                         group_size=3)[0], adv_none)
    # batch std of all six scores: deviations from 2 are (-1,0,1,-2,-2,4), Σ² = 26, /5 → 5.2
    adv_batch, _ = grpo(mask=MASK, scores=SCORES, group_size=3, scale_rewards="batch", eps=0.0)
    close(adv_batch[:, 0], torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]) / math.sqrt(5.2))


def test_grpo_with_interleaved_group_ids_and_singletons():
    perm = torch.tensor([0, 3, 1, 4, 2, 5])
    ids = torch.tensor([7, 3, 7, 3, 7, 3])
    adv, _ = grpo(mask=MASK, scores=SCORES[perm], group_ids=ids, eps=0.0)
    expected, _ = grpo(mask=MASK, scores=SCORES, group_size=3, eps=0.0)
    close(adv, expected[perm])
    single, _ = grpo(mask=MASK[:2], scores=torch.tensor([5.0, 1.0]), group_ids=torch.tensor([0, 1]))
    assert torch.equal(single, torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="scale_rewards"):
        grpo(mask=MASK, scores=SCORES, group_size=3, scale_rewards="sequence")
    with pytest.raises(ConfigError, match="group_size"):
        grpo(mask=MASK, scores=SCORES, group_size=4)


def test_rloo_leave_one_out_baselines():
    # baselines: (2+3)/2, (1+3)/2, (1+2)/2 and (0+6)/2, (0+6)/2, (0+0)/2
    adv, ret = rloo(mask=MASK, scores=SCORES, group_size=3)
    assert ret is None
    close(adv[:, 0], [1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 3.0, 0 - 3.0, 6 - 0.0])
    with pytest.raises(ConfigError, match="at least 2"):
        rloo(mask=MASK[:3], scores=SCORES[:3], group_ids=torch.tensor([0, 0, 1]))


def test_remax_subtracts_greedy_reward_and_sums_token_rewards():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    adv, _ = remax(mask=mask, scores=torch.tensor([1.0, 0.2]),
                   baseline_scores=torch.tensor([0.5, 0.7]))
    close(adv, [[0.5, 0.5, 0.0], [0.0, -0.5, -0.5]])
    token_rewards = torch.tensor([[0.25, 0.75, 5.0], [9.0, 0.0, 0.2]])  # masked sum: 1.0, 0.2
    adv_tok, _ = remax(mask=mask, rewards=token_rewards, baseline_scores=torch.tensor([0.5, 0.7]))
    close(adv_tok, adv)


def test_kl_shaped_rewards_and_reinforce_pp_normalisation():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ref = torch.zeros(2, 3)
    logprobs = torch.tensor([[0.2, -0.1, 0.0], [0.1, 0.1, 0.3]])  # k1 = logprobs here
    rewards, kl = kl_shaped_rewards(torch.tensor([1.0, 0.0]), logprobs, ref, mask, kl_coef=0.1)
    close(rewards, [[-0.02, 1.01, 0.0], [-0.01, -0.01, -0.03]])
    close(kl, [[0.2, -0.1, 0.0], [0.1, 0.1, 0.3]])
    adv, ret = reinforce_pp(mask=mask, rewards=rewards)
    # returns-to-go (γ = 1): row 0: 0.99, 1.01; row 1: -0.05, -0.04, -0.03
    close(ret, [[0.99, 1.01, 0.0], [-0.05, -0.04, -0.03]])
    g = torch.tensor([0.99, 1.01, -0.05, -0.04, -0.03])
    mean = 1.88 / 5
    std = math.sqrt(float(((g - mean) ** 2).sum()) / 4)
    close(adv[mask.bool()], (g - mean) / std, tol=1e-4)
    assert float(adv[0, 2]) == 0.0
    close(masked_mean(adv, mask), 0.0)
    close(masked_var(adv, mask), 1.0, tol=1e-4)


def test_reinforce_plain_and_with_baseline():
    mask = torch.tensor([[1, 0], [1, 1]])
    adv, _ = reinforce(mask=mask, scores=torch.tensor([3.0, 1.0]))
    close(adv, [[3.0, 0.0], [1.0, 1.0]])
    adv_b, _ = reinforce(mask=mask, scores=torch.tensor([3.0, 1.0]), baseline=True)
    close(adv_b, [[1.0, 0.0], [-1.0, -1.0]])


def test_whiten_and_masked_stats():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    close(masked_mean(x, mask), 2.5)
    close(masked_var(x, mask), 5 / 3)
    close(masked_var(x, mask, unbiased=False), 1.25)
    w = whiten(x, mask, eps=0.0)
    close(w, [[-1.5 / math.sqrt(5 / 3), -0.5 / math.sqrt(5 / 3), 0.0],
              [0.5 / math.sqrt(5 / 3), 1.5 / math.sqrt(5 / 3), 0.0]])
    close(whiten(x, mask, shift_mean=False, eps=0.0), (w + 2.5) * mask)


def test_registry_uniform_call_and_errors():
    assert {"gae", "grpo", "dr_grpo", "rloo", "remax", "reinforce_pp", "reinforce"} <= set(
        ADVANTAGE_ESTIMATORS.names())
    rollout = {"mask": MASK, "scores": SCORES, "group_size": 3, "values": torch.zeros(6, 3),
               "baseline_scores": torch.zeros(6), "logprobs": None, "ref_logprobs": None}
    for name in ADVANTAGE_ESTIMATORS.names():
        adv, _ = ADVANTAGE_ESTIMATORS.get(name)(**rollout)
        assert adv.shape == (6, 3) and torch.equal(adv[:, 2], torch.zeros(6)), name
    with pytest.raises(ConfigError, match="lamda"):
        ADVANTAGE_ESTIMATORS.get("gae")(**rollout, lamda=0.9)
    with pytest.raises(ConfigError, match="allowed values"):
        ADVANTAGE_ESTIMATORS.get("ppo")


def test_kl_controllers():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 12 ≫ target: the error clips at +0.2, β ← 0.1 · (1 + 0.2 · 256 / 10000)
    assert ctl.update(current_kl=12.0, n_steps=256) == pytest.approx(0.1 * 1.00512)
    up = ctl.kl_coef
    assert ctl.update(current_kl=6.6, n_steps=256) == pytest.approx(up * (1 + 0.1 * 0.0256))
    before = ctl.kl_coef
    ctl.update(current_kl=1.0, n_steps=256)
    assert ctl.kl_coef < before
    restored = AdaptiveKLController(0.5, 6.0, 10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.kl_coef == ctl.kl_coef
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05
    with pytest.raises(ConfigError):
        AdaptiveKLController(0.1, target=0.0, horizon=1)
