"""The general-preference (Nash) terms of INPO, DNO and EGPO: hand-computed values, the
direction each pushes a pair, and the points they are minimised at."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.losses.online_preference import dno_regression, inpo_square, online_ipo
from alignlab.losses.preference import PREFERENCE_LOSSES
from alignlab.losses.preference.base import PreferenceInputs


def pair(a: float, b: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor([[a, b]], dtype=torch.float64, requires_grad=grad)


def p(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---- INPO

def test_inpo_square_value():
    # ητ = ½: h = (−1 + 2) − ½·(−2 + 1) − ½·0 = 1.5; η/2 = 1
    # 0.75·(1.5 − 1)² + 0.25·(−1.5 − 1)² = 0.1875 + 1.5625
    loss = inpo_square(pair(-1, -2), pair(-1.5, -1.5), pair(-2, -1), p(0.75), eta=2.0, tau=0.25)
    assert loss.item() == pytest.approx(1.75)


def test_inpo_square_with_a_hard_label_is_the_papers_loss_on_the_ordered_pair():
    """P = 1: (h(y₁, y₂) − η/2)²; P = 0: the pair read as (y₂, y₁), h(y₂, y₁) = −h(y₁, y₂)."""
    args = (pair(-1, -2), pair(-1.5, -1.2), pair(-2, -1))
    kw = {"eta": 1.0, "tau": 0.4}
    h = 1 - 0.4 * (-1) - 0.6 * (-0.3)
    assert inpo_square(*args, p(1.0), **kw).item() == pytest.approx((h - 0.5) ** 2)
    swapped = (pair(-2, -1), pair(-1.2, -1.5), pair(-1, -2))
    assert inpo_square(*args, p(0.0), **kw).item() == pytest.approx(
        inpo_square(*swapped, p(1.0), **kw).item())


def test_inpo_square_raises_the_preferred_sample_and_lowers_the_other():
    """At π_θ = π_t = π_ref (h = 0) the gradient on log π(y₁) is η·(1 − 2P): descent raises y₁
    when it is preferred, lowers it when it is not, and leaves a coin flip alone."""
    for prob, expected in ((1.0, -2.0), (0.0, 2.0), (0.5, 0.0)):
        logps = pair(-2, -2, grad=True)
        inpo_square(logps, pair(-2, -2), pair(-2, -2), p(prob), eta=2.0, tau=0.1).sum().backward()
        assert logps.grad[0, 0].item() == pytest.approx(expected)
        assert logps.grad[0, 1].item() == pytest.approx(-expected)


def test_inpo_square_is_minimised_at_the_mirror_descent_step():
    """h* = η·(P − ½): log π_θ(y₁)/π_θ(y₂) = ητ·(ref ratio) + (1 − ητ)·(π_t ratio) + η·(P − ½)."""
    eta, tau, prob = 2.0, 0.25, 0.75
    target = eta * tau * (-1.0) + (1 - eta * tau) * 0.4 + eta * (prob - 0.5)
    logps = pair(-1.0, -1.0 - target, grad=True)
    inpo_square(logps, pair(-1.0, -1.4), pair(-2.0, -1.0), p(prob), eta=eta, tau=tau
                ).sum().backward()
    assert logps.grad.abs().max().item() == pytest.approx(0.0, abs=1e-12)


def test_inpo_square_mixes_pi_t_and_pi_ref_by_eta_tau():
    """ητ = 1: only π_ref counts (π_t's log-ratio drops out); τ = 0: only π_t."""
    logps, ref, prob = pair(-1, -2), pair(-2, -1), p(1.0)
    only_ref = inpo_square(logps, pair(-5, 0), ref, prob, eta=2.0, tau=0.5)
    assert only_ref.item() == pytest.approx((1 - (-1) - 1) ** 2)
    only_t = inpo_square(logps, pair(-1.5, -1.5), pair(0, -9), prob, eta=2.0, tau=0.0)
    assert only_t.item() == pytest.approx((1 - 1) ** 2)


@pytest.mark.parametrize("eta,tau", [(0.0, 0.1), (1.0, -0.1), (4.0, 0.5)])
def test_inpo_square_rejects_a_step_outside_the_mirror_descent_range(eta, tau):
    with pytest.raises(ValueError, match="eta"):
        inpo_square(pair(-1, -1), pair(-1, -1), pair(-1, -1), p(1.0), eta=eta, tau=tau)


# ---- DNO

def test_dno_regression_value():
    # m = 0.5·((−1 + 1.5) − (−2 + 1.5)) = 0.5
    logps, old = pair(-1, -2), pair(-1.5, -1.5)
    hard = dno_regression(logps, old, p(1.0), eta=0.5)
    assert hard.item() == pytest.approx(math.log1p(math.exp(-0.5)))
    soft = dno_regression(logps, old, p(0.7), eta=0.5)
    assert soft.item() == pytest.approx(0.7 * math.log1p(math.exp(-0.5))
                                        + 0.3 * math.log1p(math.exp(0.5)))


def test_dno_regression_with_label_1_is_dpo_with_pi_t_as_the_reference():
    logps, old = pair(-1.2, -2.5), pair(-1.5, -1.1)
    dpo = PREFERENCE_LOSSES.get("sigmoid")(PreferenceInputs(
        chosen_logps=logps[:, 0], rejected_logps=logps[:, 1], ref_chosen_logps=old[:, 0],
        ref_rejected_logps=old[:, 1]), beta=0.3)
    torch.testing.assert_close(dno_regression(logps, old, p(1.0), eta=0.3), dpo.losses)


def test_dno_regression_pushes_towards_its_label():
    """At π_θ = π_t the gradient on log π(y₁) is −η·(L − ½): L > ½ raises y₁ over y₂."""
    for label, expected in ((1.0, -0.5), (0.2, 0.3), (0.5, 0.0)):
        logps = pair(-2, -3, grad=True)
        dno_regression(logps, pair(-2, -3), p(label), eta=1.0).sum().backward()
        assert logps.grad[0, 0].item() == pytest.approx(expected)
        assert logps.grad[0, 1].item() == pytest.approx(-expected)


def test_dno_regression_rejects_eta_0():
    with pytest.raises(ValueError, match="eta"):
        dno_regression(pair(-1, -1), pair(-1, -1), p(1.0), eta=0.0)


# ---- EGPO (online IPO)

def test_online_ipo_value():
    # margin (−1 + 2) − (−2 + 1) = 2, target 0.25 / 0.5 = 0.5
    assert online_ipo(pair(-1, -2), pair(-2, -1), p(0.25), kl_coef=0.5).item() == pytest.approx(
        2.25)


def test_online_ipo_raises_the_sample_with_the_higher_win_rate():
    """At π_θ = π_ref the gradient on log π(y₁) is −2Δ/τ: Δ > 0 raises y₁ over y₂."""
    for delta in (0.3, -0.3):
        logps = pair(-2, -3, grad=True)
        online_ipo(logps, pair(-2, -3), p(delta), kl_coef=0.5).sum().backward()
        assert logps.grad[0, 0].item() == pytest.approx(-2 * delta / 0.5)
        assert logps.grad[0, 1].item() == pytest.approx(2 * delta / 0.5)


def test_online_ipo_with_a_hard_label_is_ipo():
    """Δ = ½ (y₁ always wins): IPO's (h − 1/(2τ))² with τ its β."""
    logps, ref = pair(-1.2, -2.5), pair(-1.5, -1.1)
    ipo = PREFERENCE_LOSSES.get("ipo")(PreferenceInputs(
        chosen_logps=logps[:, 0], rejected_logps=logps[:, 1], ref_chosen_logps=ref[:, 0],
        ref_rejected_logps=ref[:, 1]), beta=0.4)
    torch.testing.assert_close(online_ipo(logps, ref, p(0.5), kl_coef=0.4), ipo.losses)


def test_online_ipo_rejects_kl_coef_0():
    with pytest.raises(ValueError, match="kl_coef"):
        online_ipo(pair(-1, -1), pair(-1, -1), p(0.0), kl_coef=0.0)
