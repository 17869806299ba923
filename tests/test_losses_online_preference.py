"""The online preference terms on hand-computed values, with a test pinning each sign."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignlab.losses.online_preference import (
    ONLINE_PREFERENCE_TERMS,
    geometric_mixture,
    nash_md_pg,
    p3o_joint,
    p3o_separate,
    selm_optimism,
    sppo_square,
    vpo_value,
    xpo_exploration,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_registry_names_every_term():
    assert set(ONLINE_PREFERENCE_TERMS.names()) == {
        "xpo_exploration", "nash_md_pg", "geometric_mixture", "sppo_square", "p3o_joint",
        "p3o_separate", "selm_optimism", "vpo_value", "inpo_square", "dno_regression",
        "online_ipo"}


# ---- XPO

def test_xpo_exploration_value():
    torch.testing.assert_close(xpo_exploration(t(-2.0, -4.0), alpha=0.5),
                               torch.tensor([-1.0, -2.0], dtype=torch.float64))


def test_xpo_exploration_lowers_the_reference_samples_likelihood():
    """Sign (paper and TRL): the term is added to a minimised loss, so a descent step lowers
    log π(ỹ) — away from what π_ref says, i.e. exploration."""
    logps = t(-2.0)
    xpo_exploration(logps, alpha=0.1).sum().backward()
    assert logps.grad.item() == pytest.approx(0.1)  # positive: descent lowers log π(ỹ)


def test_xpo_exploration_rejects_a_negative_alpha():
    with pytest.raises(ValueError, match="alpha"):
        xpo_exploration(t(-1.0), alpha=-0.1)


# ---- Nash-MD

def test_nash_md_pg_value():
    # −(0.8 − ½)·(−3) + 0.1·(−3 − (−2))·(−3) = 0.9 + 0.3
    loss = nash_md_pg(t(-3.0), t(-2.0), t(0.8), kl_coef=0.1)
    assert loss.item() == pytest.approx(1.2)


def test_nash_md_pg_gradient_pushes_up_a_winner_and_down_a_loser():
    for p, sign in ((0.9, -1), (0.1, 1)):
        logps = t(-3.0)
        nash_md_pg(logps, t(-3.0), t(p), kl_coef=0.0).sum().backward()
        assert logps.grad.item() == pytest.approx(-(p - 0.5))
        assert math.copysign(1, logps.grad.item()) == sign


def test_nash_md_pg_kl_term_pulls_towards_the_reference():
    """A tie (P = ½): only the KL acts; a sample the policy likes more than the reference is
    pushed down (gradient τ·(log π − log π_ref) > 0), one it likes less pushed up."""
    above, below = t(-1.0), t(-5.0)
    nash_md_pg(above, t(-2.0), t(0.5), kl_coef=0.2).sum().backward()
    nash_md_pg(below, t(-2.0), t(0.5), kl_coef=0.2).sum().backward()
    assert above.grad.item() == pytest.approx(0.2 * 1.0)
    assert below.grad.item() == pytest.approx(0.2 * -3.0)


def test_nash_md_pg_detaches_the_log_ratio():
    ref = t(-2.0)
    nash_md_pg(t(-1.0), ref, t(0.5), kl_coef=0.2).sum().backward()
    assert ref.grad is None or ref.grad.item() == 0


def test_geometric_mixture_values():
    logits = torch.tensor([[0.0, math.log(3.0)]])   # π = (¼, ¾)
    ref = torch.tensor([[math.log(3.0), 0.0]])      # π_ref = (¾, ¼)
    half = geometric_mixture(logits, ref, mixture_coef=0.5).exp()
    torch.testing.assert_close(half, torch.tensor([[0.5, 0.5]]))
    # β = ¼: p₁/p₂ = (¼)^¾(¾)^¼ / ((¾)^¾(¼)^¼) = 3^(−½)
    quarter = geometric_mixture(logits, ref, mixture_coef=0.25).exp()
    p1 = 1 / (1 + math.sqrt(3))
    torch.testing.assert_close(quarter, torch.tensor([[p1, 1 - p1]]))


def test_geometric_mixture_ends_are_the_two_models():
    """Direction: β weighs the *reference* (β = 0 is the policy), as mixture_coef in TRL."""
    g = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    torch.testing.assert_close(geometric_mixture(logits, ref, mixture_coef=0.0),
                               F.log_softmax(logits, -1))
    torch.testing.assert_close(geometric_mixture(logits, ref, mixture_coef=1.0),
                               F.log_softmax(ref, -1))
    near_ref = geometric_mixture(logits, ref, mixture_coef=0.9).exp()
    assert (near_ref - F.softmax(ref, -1)).abs().sum() < (near_ref - F.softmax(logits, -1)).abs().sum()


def test_geometric_mixture_is_the_mixture_of_raw_logits_too():
    """TRL mixes raw logits; the normalisers are constants per row, so it is the same mixture."""
    g = torch.Generator().manual_seed(1)
    logits, ref = torch.randn(2, 5, generator=g), 3 + torch.randn(2, 5, generator=g)
    torch.testing.assert_close(geometric_mixture(logits, ref, mixture_coef=0.3),
                               F.log_softmax(0.3 * ref + 0.7 * logits, -1))


def test_geometric_mixture_rejects_a_coefficient_outside_0_1():
    with pytest.raises(ValueError, match="mixture_coef"):
        geometric_mixture(torch.zeros(1, 2), torch.zeros(1, 2), mixture_coef=1.5)


# ---- SPPO

def test_sppo_square_value():
    # (−1 − (−2) − 2·(0.75 − ½))² = (1 − 0.5)²
    assert sppo_square(t(-1.0), t(-2.0), t(0.75), eta=2.0).item() == pytest.approx(0.25)


def test_sppo_square_pushes_up_a_winner_and_down_a_loser():
    """At log π = log π_t the target η·(P̂ − ½) sets the direction: P̂ > ½ up, P̂ < ½ down."""
    for p, sign in ((0.8, -1), (0.2, 1)):
        logps = t(-2.0)
        sppo_square(logps, t(-2.0), t(p), eta=1.0).sum().backward()
        assert logps.grad.item() == pytest.approx(-2 * (p - 0.5))
        assert math.copysign(1, logps.grad.item()) == sign


def test_sppo_square_is_zero_at_its_target_and_rejects_eta_0():
    assert sppo_square(t(-1.5), t(-2.0), t(1.0), eta=1.0).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="eta"):
        sppo_square(t(-1.0), t(-1.0), t(0.5), eta=0.0)


# ---- P3O

def test_p3o_joint_value_clipped_and_unclipped():
    logps, old = t(-1.0, -2.0).reshape(1, 2), torch.tensor([[-1.5, -1.8]], dtype=torch.float64)
    # ρ = exp((−1 + 1.5) − (−2 + 1.8)) = e^0.7 ≈ 2.01 > 1.2: A = 1 is clipped, A = −1 is not
    assert p3o_joint(logps, old, t(1.0), clip_eps=0.2).item() == pytest.approx(-1.2)
    assert p3o_joint(logps, old, t(-1.0), clip_eps=0.2).item() == pytest.approx(math.exp(0.7))


def test_p3o_joint_gradient_is_the_pairwise_policy_gradient():
    """At θ = θ_old (ρ = 1) the gradient is −A·(∇log π(y₁) − ∇log π(y₂)): descent raises the
    better completion and lowers the other (A > 0: y₁ better)."""
    logps = t(-1.0, -2.0).reshape(1, 2)
    logps.retain_grad()
    p3o_joint(logps, logps.detach().clone(), t(0.5)).sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5, 0.5]], dtype=torch.float64))


def test_p3o_joint_is_invariant_to_a_shift_of_both_log_probs():
    logps, old = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.2, -1.9]])
    a = p3o_joint(logps, old, torch.tensor([0.7]))
    b = p3o_joint(logps + 3.0, old + 3.0, torch.tensor([0.7]))
    torch.testing.assert_close(a, b)


def test_p3o_separate_value_and_gradient():
    logps, old = t(-1.0, -2.0).reshape(1, 2), torch.tensor([[-1.5, -1.8]], dtype=torch.float64)
    # y₁: ρ₁ = e^0.5 > 1.2 clipped → −1.2; y₂: ρ₂ = e^−0.2, A₂ = −1 → −min(−e^−0.2, −e^−0.2)
    expected = -1.2 + math.exp(-0.2)
    assert p3o_separate(logps, old, t(1.0), clip_eps=0.2).item() == pytest.approx(expected)
    fresh = t(-1.0, -2.0).reshape(1, 2)
    fresh.retain_grad()
    p3o_separate(fresh, fresh.detach().clone(), t(0.5)).sum().backward()
    torch.testing.assert_close(fresh.grad, torch.tensor([[-0.5, 0.5]], dtype=torch.float64))


@pytest.mark.parametrize("fn", [p3o_joint, p3o_separate])
def test_p3o_rejects_a_clip_range_outside_0_1(fn):
    with pytest.raises(ValueError, match="clip_eps"):
        fn(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), clip_eps=1.5)


# ---- SELM

def test_selm_optimism_value():
    # α·β·(log π − log π_ref) = 0.5·0.1·((−2 + 3), (−4 + 1))
    torch.testing.assert_close(selm_optimism(t(-2.0, -4.0), t(-3.0, -1.0), alpha=0.5, beta=0.1),
                               torch.tensor([0.05, -0.15], dtype=torch.float64))


def test_selm_optimism_lowers_the_reference_samples_likelihood():
    """Sign (the paper's Algorithm 1, −α·E_{y~π_ref}[log π_θ(y)] maximised, and the authors'
    ``+ alpha * beta * response_logratios`` minimised): descent lowers log π_θ(y); log π_ref is a
    constant."""
    logps = t(-2.0)
    selm_optimism(logps, torch.tensor([-3.0]), alpha=0.5, beta=0.1).sum().backward()
    assert logps.grad.item() == pytest.approx(0.05)  # positive: descent lowers log π(y)


def test_selm_optimism_rejects_a_negative_alpha_or_a_zero_beta():
    with pytest.raises(ValueError, match="alpha"):
        selm_optimism(t(-1.0), t(-1.0), alpha=-0.1, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        selm_optimism(t(-1.0), t(-1.0), alpha=0.1, beta=0.0)


# ---- VPO

def test_vpo_value_value_online_and_offline():
    # sign·α·β·(log π − log π_ref): +0.2·0.5·(−1 − (−2)) and −0.2·0.5·(−3 − (−2))
    torch.testing.assert_close(vpo_value(t(-1.0), t(-2.0), sign=1, alpha=0.2, beta=0.5),
                               torch.tensor([0.1], dtype=torch.float64))
    torch.testing.assert_close(vpo_value(t(-3.0), t(-2.0), sign=-1, alpha=0.2, beta=0.5),
                               torch.tensor([0.1], dtype=torch.float64))


def test_vpo_value_is_optimistic_online_and_pessimistic_offline():
    """Sign: online (+1) descent lowers log π_θ on π_cal's samples (the value β·log Z rises:
    optimism, SELM's direction); offline (−1) it raises them (back towards the data:
    pessimism)."""
    online, offline = t(-2.0), t(-2.0)
    vpo_value(online, t(-2.0), sign=1, alpha=0.3, beta=0.1).sum().backward()
    vpo_value(offline, t(-2.0), sign=-1, alpha=0.3, beta=0.1).sum().backward()
    assert online.grad.item() == pytest.approx(0.03)
    assert offline.grad.item() == pytest.approx(-0.03)


def test_vpo_value_online_is_selms_term():
    logps, ref = t(-1.0, -5.0), t(-2.0, -4.0)
    torch.testing.assert_close(vpo_value(logps, ref, sign=1, alpha=0.3, beta=0.2),
                               selm_optimism(logps, ref, alpha=0.3, beta=0.2))


def test_vpo_value_rejects_a_bad_sign_alpha_or_beta():
    with pytest.raises(ValueError, match="sign"):
        vpo_value(t(-1.0), t(-1.0), sign=0, alpha=0.1, beta=0.1)
    with pytest.raises(ValueError, match="alpha"):
        vpo_value(t(-1.0), t(-1.0), sign=1, alpha=-0.1, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        vpo_value(t(-1.0), t(-1.0), sign=-1, alpha=0.1, beta=-1.0)
