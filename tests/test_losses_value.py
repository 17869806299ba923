import pytest
import torch

from alignlab.losses.value import VALUE_LOSSES, clipped_value_loss, mse_value_loss


def test_clipped_value_loss_by_hand():
    # token 0: V moved 0.5 past V_old; clipped V = 1.2 is further from R = 2 → ½·0.8² = 0.32,
    #          and the clipped branch is constant in V: no gradient.
    # token 1: V within ε of V_old: both branches equal → ½·0.9² = 0.405, grad V − R = −0.9.
    # token 2: clipped V = 1.2 is closer to R = 1 than V = 1.5 → ½·0.5² = 0.125.
    # token 3: padding.
    values = torch.tensor([[1.5, 1.1, 1.5, 7.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip_eps=0.2)
    assert torch.allclose(loss, torch.tensor([[0.32, 0.405, 0.125, 0.0]]))
    loss.sum().backward()
    assert torch.allclose(values.grad, torch.tensor([[0.0, -0.9, 0.5, 0.0]]))
    assert float(metrics["value_clip_fraction"]) == pytest.approx(1 / 3)
    assert float(metrics["value_mean"]) == pytest.approx(4.1 / 3)


def test_mse_value_loss_and_registry():
    values = torch.tensor([[1.0, 3.0]])
    returns = torch.tensor([[2.0, 3.0]])
    loss, metrics = mse_value_loss(values, None, returns, torch.tensor([[1, 1]]))
    assert loss.tolist() == [[0.5, 0.0]]
    assert "value_explained_variance" in metrics
    assert VALUE_LOSSES.get("clipped") is clipped_value_loss
    assert VALUE_LOSSES.get("mse") is mse_value_loss
