"""KTO, BCO, AOT (unpaired) and DRO: hand-computed values and special cases."""

import math

import pytest
import torch

from alignlab.losses.preference import PREFERENCE_LOSSES, PreferenceInputs


def ls(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def unpaired(logps=(-3.0, -5.0, -4.0), labels=(True, False, True), **extra):
    """r = π − ref = [1, −1, 0]."""
    ref = torch.full((len(logps),), -4.0, dtype=torch.float64)
    return PreferenceInputs(logps=t(*logps), ref_logps=ref, labels=torch.tensor(labels), **extra)


def run(name, inputs, **kw):
    return PREFERENCE_LOSSES.get(name)(inputs, **kw)


def test_kto_value():
    result = run("kto", unpaired(kl_ref=0.2), beta=0.1)
    expected = t(1 - sig(0.1 * 0.8), 1 - sig(0.1 * 1.2), 1 - sig(0.1 * -0.2))
    assert torch.allclose(result.losses, expected)
    assert torch.allclose(result.chosen_rewards, t(0.1, 0.0))
    assert torch.allclose(result.rejected_rewards, t(-0.1))
    weighted = run("kto", unpaired(kl_ref=0.2), beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    assert torch.allclose(weighted.losses, expected * t(2.0, 0.5, 2.0))


def test_kto_reference_point_is_clamped_and_defaults_to_zero():
    no_kl, negative_kl = run("kto", unpaired()), run("kto", unpaired(kl_ref=torch.tensor(-3.0)))
    assert torch.allclose(no_kl.losses, negative_kl.losses)
    assert no_kl.losses[0].item() == pytest.approx(1 - sig(0.1))


def test_unpaired_rewards_are_detached():
    inputs = unpaired(kl_ref=0.2)
    inputs.logps.requires_grad_()
    result = run("kto", inputs)
    assert result.losses.requires_grad
    assert not result.chosen_rewards.requires_grad and not result.rejected_rewards.requires_grad
    assert not any(v.requires_grad for v in result.metrics.values())


def test_kto_all_desirable_labels():
    all_good = unpaired(labels=(True, True, True), kl_ref=0.0)
    result = run("kto", all_good, beta=0.1, undesirable_weight=7.0)
    assert torch.allclose(result.losses, t(1 - sig(0.1), 1 - sig(-0.1), 1 - sig(0.0)))
    assert result.rejected_rewards.numel() == 0 and "rewards/rejected" not in result.metrics
    assert all(torch.isfinite(v).all() for v in result.metrics.values())
    logps = torch.tensor([-3.0, -5.0], requires_grad=True)
    run("kto", PreferenceInputs(logps=logps, ref_logps=torch.tensor([-4.0, -4.0]),
                                labels=torch.tensor([True, True]))).losses.sum().backward()
    assert (logps.grad < 0).all()  # every desirable output is pushed up


def test_bco_value():
    result = run("bco", unpaired(), beta=0.1, reward_shift=0.05)
    assert torch.allclose(result.losses, t(-ls(0.05), -ls(0.15), -ls(-0.05)))
    assert result.metrics["rewards/mean"].item() == pytest.approx(0.0)


def test_apo_zero_unpaired_value_and_weights():
    # r = [1, −1, 0], labels [desirable, undesirable, desirable]
    result = run("apo_zero_unpaired", unpaired(), beta=0.5, desirable_weight=2.0,
                 undesirable_weight=0.5)
    assert torch.allclose(result.losses, t(2.0 * (1 - sig(0.5)), 0.5 * sig(-0.5), 2.0 * 0.5))
    assert torch.allclose(result.chosen_rewards, t(0.5, 0.0))
    assert torch.allclose(run("apo_zero_unpaired", unpaired()).losses,
                          t(1 - sig(0.1), sig(-0.1), 0.5))


def test_apo_zero_unpaired_raises_desirable_and_lowers_undesirable_likelihoods():
    inputs = unpaired()
    inputs.logps.requires_grad_()
    run("apo_zero_unpaired", inputs).losses.sum().backward()
    grad = inputs.logps.grad
    assert grad[0] < 0 and grad[2] < 0 and grad[1] > 0


def test_aot_unpaired_quantiles():
    inputs = unpaired(logps=(-3.0, -5.0, -4.0, -6.0), labels=(True, False, True, False))
    # desirable r sorted [0, 1], undesirable [−2, −1] → deltas [2, 2]
    assert torch.allclose(run("aot_unpaired", inputs).losses, t(-ls(0.2), -ls(0.2)))
    uneven = unpaired(logps=(-4.0, -3.0, -1.0, -5.0), labels=(True, True, True, False))
    # one quantile (the median): desirable 1, undesirable −1
    assert torch.allclose(run("aot_unpaired", uneven).losses, t(-ls(0.2)))


def test_aot_unpaired_needs_both_labels():
    with pytest.raises(ValueError, match="both desirable and undesirable"):
        run("aot_unpaired", unpaired(labels=(True, True, True)))


def test_dro_value_and_gradients():
    logps = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    values = torch.tensor([0.2, 0.2], dtype=torch.float64, requires_grad=True)
    inputs = PreferenceInputs(logps=logps, ref_logps=t(-4.0, -4.0), rewards=t(1.0, -1.0), values=values)
    result = run("dro_pointwise", inputs, beta=0.1)
    # residuals: 1 − 0.2 − 0.1 = 0.7 and −1 − 0.2 + 0.1 = −1.1
    assert torch.allclose(result.losses, t(0.5 * 0.7**2, 0.5 * 1.1**2))
    result.losses.sum().backward()
    assert logps.grad[0] < 0 and logps.grad[1] > 0  # good outputs up, bad down
    assert values.grad is not None


def test_dro_rewards_and_a_plain_number_as_the_value():
    # r = π − ref = (2, −0.5): rewards β·r = (1, −0.25); labels: reward above V(x) = 0.5
    inputs = PreferenceInputs(logps=t(-2.0, -4.5), ref_logps=t(-4.0, -4.0), rewards=t(1.0, 0.0),
                              values=t(0.5, 0.5))
    result = run("dro_pointwise", inputs, beta=0.5)
    torch.testing.assert_close(result.chosen_rewards, t(1.0))
    torch.testing.assert_close(result.rejected_rewards, t(-0.25))
    # V(x) may be one number for every prompt
    scalar = run("dro_pointwise", PreferenceInputs(logps=inputs.logps, ref_logps=inputs.ref_logps,
                                                  rewards=inputs.rewards, values=0.5), beta=0.5)
    torch.testing.assert_close(scalar.losses, result.losses)
    torch.testing.assert_close(scalar.chosen_rewards, t(1.0))
