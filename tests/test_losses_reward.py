"""Reward-model losses and calibration metrics on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.core.errors import ConfigError
from alignlab.losses.reward import (
    REWARD_MODEL_LOSSES,
    bradley_terry_loss,
    bradley_terry_margin_loss,
    centering_penalty,
    loss_format,
    mse_loss,
    plackett_luce_loss,
)
from alignlab.rewards.calibration import (
    expected_calibration_error,
    pairwise_accuracy,
    preference_ece,
    preference_metrics,
    score_pairs,
)


def test_registry_names_and_formats():
    assert set(REWARD_MODEL_LOSSES.names()) == {"bradley_terry", "bradley_terry_margin",
                                                "plackett_luce", "mse"}
    assert loss_format("bradley_terry") == "preference"
    assert loss_format("plackett_luce") == "ranked"
    assert loss_format("mse") == "prompt_completion"
    assert REWARD_MODEL_LOSSES.get("bradley_terry_margin").uses_margin
    assert not REWARD_MODEL_LOSSES.get("bradley_terry").uses_margin
    with pytest.raises(ConfigError, match="allowed values: bradley_terry"):
        REWARD_MODEL_LOSSES.get("bt")


def test_bradley_terry_values():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0]))
    expected = [math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(2))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_margin_values_and_requirement():
    # r_c − r_r − m = 2 − 1 − 1 = 0 → log 2; a margin of 3 makes a won pair a loss of log(1+e²)
    loss = bradley_terry_margin_loss(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]),
                                     torch.tensor([1.0, 3.0]))
    assert loss.tolist() == pytest.approx([math.log(2), math.log(1 + math.exp(2))], abs=1e-6)
    with pytest.raises(ConfigError, match="margin"):
        bradley_terry_margin_loss(torch.tensor([1.0]), torch.tensor([0.0]))


def test_bradley_terry_gradient_pushes_chosen_up_rejected_down():
    chosen = torch.tensor([0.3, -0.2], requires_grad=True)
    rejected = torch.tensor([0.1, 0.4], requires_grad=True)
    bradley_terry_loss(chosen, rejected).sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # dℓ/dr_c = −σ(r_r − r_c)
    assert chosen.grad.tolist() == pytest.approx([-1 / (1 + math.exp(0.2)), -1 / (1 + math.exp(-0.6))], abs=1e-6)


def test_plackett_luce_hand_computed_and_ragged():
    # scores order the items 2, 1, 0; rewards in that order are 2, 1, 0
    rewards = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 99.0]], requires_grad=True)
    scores = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss = plackett_luce_loss(rewards, scores, mask)
    first = (math.log(math.exp(2) + math.exp(1) + 1) - 2) + (math.log(math.exp(1) + 1) - 1)
    second = math.log(1 + math.exp(-1))  # a list of two is Bradley-Terry; the padding is ignored
    assert loss.tolist() == pytest.approx([first, second], abs=1e-5)
    for numeric in (mask.long(), mask.float()):  # a 0/1 mask of any dtype is the same mask
        assert plackett_luce_loss(rewards, scores, numeric).tolist() == pytest.approx(loss.tolist())
    loss.sum().backward()
    assert torch.isfinite(rewards.grad).all()
    assert rewards.grad[1, 2] == 0
    assert rewards.grad[0, 2] < 0 and rewards.grad[0, 0] > 0  # best item up, worst down


def test_plackett_luce_with_two_items_equals_bradley_terry():
    r = torch.tensor([[0.7, -0.4], [-1.0, 0.5]])
    pl = plackett_luce_loss(r, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert pl.tolist() == pytest.approx(bradley_terry_loss(r[:, 0], r[:, 1]).tolist(), abs=1e-6)


def test_mse_and_centering():
    assert mse_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).tolist() == [1.0, 4.0]
    r = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])
    assert centering_penalty(r, coef=0.5).tolist() == [4.5, 0.0]  # 0.5·(1+2)², 0.5·0²
    assert centering_penalty(r).tolist() == [0.0, 0.0]  # off unless a coefficient is given
    masked = centering_penalty(r, torch.tensor([[True, False], [True, True]]), coef=1.0)
    assert masked.tolist() == [1.0, 0.0]
    # the gradient of centering pulls the sum of a pair's rewards towards 0
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    centering_penalty(x, coef=1.0).sum().backward()
    assert x.grad.tolist() == [[6.0, 6.0]]


def test_pairwise_accuracy_and_ece_hand_computed():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 0.0, 1.0]), torch.tensor([0.0, 3.0, -1.0, 1.0])) == 0.625
    # bin 9: two predictions of 0.9, one right → |0.5 − 0.9| · 2/3; bin 2: |0 − 0.2| · 1/3
    ece = expected_calibration_error(torch.tensor([0.9, 0.9, 0.2]), torch.tensor([1.0, 0.0, 0.0]))
    assert ece == pytest.approx(0.4 * 2 / 3 + 0.2 / 3, abs=1e-6)
    # confidently right on every pair: both orders land in the extreme bins with 0 gap
    assert preference_ece(torch.tensor([30.0, 40.0]), torch.tensor([0.0, 0.0])) == pytest.approx(0, abs=1e-6)
    # always 50/50 and right half the time in the symmetrised view: calibrated
    assert preference_ece(torch.zeros(4), torch.zeros(4)) == pytest.approx(0, abs=1e-6)
    # confident (σ(2) ≈ 0.88) but wrong on every pair
    assert preference_ece(torch.zeros(3), torch.full((3,), 2.0)) == pytest.approx(1 / (1 + math.exp(-2)), abs=1e-5)


def test_preference_metrics_and_score_pairs():
    m = preference_metrics(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 4.0]))
    assert m["accuracy"] == 0.5 and m["chosen_reward_mean"] == 2.0 and m["rejected_reward_std"] == 2.0
    assert m["margin_mean"] == 0.0
    better, worse = score_pairs([3.0, 1.0, 2.0, 5.0], groups=[0, 0, 0, 1])
    assert sorted(zip(better, worse)) == [(0, 1), (0, 2), (2, 1)]
