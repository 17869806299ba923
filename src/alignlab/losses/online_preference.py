"""The new terms of the online preference algorithms (``algorithms/online_preference/``).

Pure tensor functions, no model calls. Log-probs are sequence sums ``log π(y | x)`` (the
preference losses' convention); every function returns one value per example (per completion or
per pair) — the trainer sums them and divides by the number of items — except
``geometric_mixture``, which returns the next-token logits Nash-MD samples its opponent from.

- ``xpo_exploration``: XPO's exploration term α·log π_θ(ỹ), ỹ ~ π_ref (added to the DPO loss);
- ``selm_optimism``: SELM's optimism term α·β·log(π_θ(y)/π_ref(y)), y ~ π_ref (added to DPO);
- ``vpo_value``: VPO's value term sign·α·β·log(π_θ(y)/π_ref(y)), y ~ π_cal: optimistic online
  (sign +1), pessimistic offline (sign −1);
- ``nash_md_pg``: Nash-MD's policy-gradient surrogate against the mixture's samples;
- ``geometric_mixture``: the token-level geometric mixture π^(1−β)·π_ref^β of two logit rows;
- ``sppo_square``: SPPO's squared regression onto η·(P̂(y ≻ π_t) − ½);
- ``p3o_joint``, ``p3o_separate``: P3O's clipped pairwise surrogates;
- ``inpo_square``: INPO's squared loss, the online-mirror-descent step on a judged pair;
- ``dno_regression``: DNO's cross-entropy of η·(log-ratio to π_t) margins against a label;
- ``online_ipo``: EGPO's online IPO regression of the log-ratio margin onto the win-rate margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlab.core.registry import Registry

ONLINE_PREFERENCE_TERMS: Registry = Registry("online preference term")


def _term(name: str, kind: str):
    """Register under ``name``; ``kind`` (per completion, per pair, logits) is what
    ``docs/losses.md`` states."""
    def decorator(fn):
        fn.kind = kind
        return ONLINE_PREFERENCE_TERMS.register(name)(fn)
    return decorator


@_term("xpo_exploration", "per completion")
def xpo_exploration(reference_sample_logps: Tensor, *, alpha: float) -> Tensor:
    """XPO's exploration term α·log π_θ(ỹ | x) on samples ỹ ~ π_ref, *added* to the (minimised)
    DPO loss.

    Xie et al. 2024, "Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation
    for Sample-Efficient RLHF", Algorithm 1: π ← argmin α·Σ log π(ỹ) − Σ log σ(β·h). Minimising
    it lowers the policy's likelihood of what the reference would say, pushing it to explore
    outside π_ref's support (TRL's ``XPOTrainer`` has the same sign: ``loss = dpo + α·logπ(ỹ)``).
    """
    if alpha < 0:
        raise ValueError(f"xpo_exploration: alpha must be >= 0, got {alpha}")
    return alpha * reference_sample_logps


@_term("selm_optimism", "per completion")
def selm_optimism(logps: Tensor, ref_logps: Tensor, *, alpha: float, beta: float) -> Tensor:
    """SELM's optimism term α·β·(log π_θ(y | x) − log π_ref(y | x)) on samples y ~ π_ref,
    *added* to the (minimised) DPO loss: α times the implicit reward r̂(y) = β·log π_θ/π_ref.

    Zhang et al. 2024, "Self-Exploring Language Models: Active Preference Elicitation for Online
    Alignment", Algorithm 1: π_θt = argmax −L_DPO(π_θ; D_t) − α·E_x[log π_θ(y | x)] with
    y ~ π_ref(· | x), then π_ref ← π_θt. The authors' trainer (``selm_trainer.py``) adds
    α·β·(log π_θ(y) − log π_ref(y)) to DPO's loss, as here: the same gradient as the algorithm's
    term with its α equal to α·β (log π_ref(y) is a constant). Descent lowers log π_θ of what
    π_ref says — weighted, as E_{y~π_ref}[∇log π_θ(y)] = E_{y~π_θ}[e^(−r̂(y)/β)·∇log π_θ(y)], most
    on responses of low implicit reward — i.e. it raises KL(π_ref ‖ π_θ): optimism."""
    if alpha < 0 or beta <= 0:
        raise ValueError(f"selm_optimism: alpha must be >= 0 and beta > 0, got {alpha}, {beta}")
    return alpha * beta * (logps - ref_logps)


@_term("vpo_value", "per completion")
def vpo_value(logps: Tensor, ref_logps: Tensor, *, sign: int, alpha: float,
              beta: float) -> Tensor:
    """VPO's value regulariser sign·α·β·(log π_θ(y | x) − log π_ref(y | x)) on samples y of the
    calibration policy π_cal, *added* to the (minimised) DPO loss; sign = +1 online (optimism),
    −1 offline (pessimism).

    Cen et al. 2024, "Value-Incentivized Preference Optimization: A Unified Approach to Online
    and Offline RLHF": the reward is the regularised MLE argmin_r ℓ(r; D) − sign·α·max_π J(r, π),
    J = E_π[r] − β·KL(π ‖ π_ref); calibrating the reward's free per-prompt shift by
    E_{y~π_cal}[r(x, y)] = 0 makes max_π J = β·log Z(x) = −β·E_{y~π_cal}[log π_r(y)/π_ref(y)], and
    with r = β·log π/π_ref + β·log Z the policy's loss is ℓ_DPO(π) + sign·α·β·E_{y~π_cal}[log
    π(y)/π_ref(y)]. Online, descent lowers log π_θ on π_cal's samples (the value goes up:
    exploration, SELM's and XPO's direction when π_cal = π_ref); offline it raises them (a
    KL(π_cal ‖ π_θ)-like pull back to the data: conservatism). The paper's full text is not in
    ``../shared/papers/`` (only its abstract); this is the derivation from its stated objective."""
    if sign not in (1, -1):
        raise ValueError(f"vpo_value: sign must be +1 (online) or -1 (offline), got {sign}")
    if alpha < 0 or beta <= 0:
        raise ValueError(f"vpo_value: alpha must be >= 0 and beta > 0, got {alpha}, {beta}")
    return sign * alpha * beta * (logps - ref_logps)


@_term("nash_md_pg", "per completion")
def nash_md_pg(logps: Tensor, ref_logps: Tensor, preference: Tensor, *,
               kl_coef: float) -> Tensor:
    """Nash-MD-PG's surrogate loss (y ~ π_θ, y′ ~ the mixture π^β_θ).

        −(P(y ≻ y′) − ½)·log π_θ(y) + τ·sg[log π_θ(y) − log π_ref(y)]·log π_θ(y)

    whose gradient is −[(P − ½)·∇log π_θ(y) − τ·∇KL(π_θ ‖ π_ref)] (REINFORCE; ½ is the control
    variate; E_y[(log π_θ/π_ref)·∇log π_θ(y)] = ∇KL). Munos et al. 2023, "Nash Learning from Human
    Feedback" (Nash-MD-PG, section 7). The KL's score-function factor is the *sequence* log-ratio,
    as in the paper; TRL's ``NashMDTrainer`` weights each token by its own log-ratio instead
    (Σ_t sg[r_t]·log π(y_t)), which drops the KL of the tokens that follow."""
    if kl_coef < 0:
        raise ValueError(f"nash_md_pg: kl_coef must be >= 0, got {kl_coef}")
    log_ratio = (logps - ref_logps).detach()
    return -(preference - 0.5) * logps + kl_coef * log_ratio * logps


@_term("geometric_mixture", "logits")
def geometric_mixture(logits: Tensor, ref_logits: Tensor, *, mixture_coef: float) -> Tensor:
    """Next-token log-probs of π^(1−β)·π_ref^β, normalised over the vocabulary:
    log_softmax((1−β)·log_softmax(z) + β·log_softmax(z_ref)).

    Munos et al. 2023, "Nash Learning from Human Feedback": Nash-MD's opponent is the geometric
    mixture of the policy and the reference; like the paper's experiments and TRL's
    ``GeometricMixtureWrapper``, it is taken token by token (exact sequence-level sampling from the
    mixture is intractable). β = 0 is the policy, β = 1 the reference. Rows whose logits are −inf
    somewhere stay −inf there."""
    if not 0 <= mixture_coef <= 1:
        raise ValueError(f"geometric_mixture: mixture_coef must be in [0, 1], got {mixture_coef}")
    if mixture_coef == 0:
        return F.log_softmax(logits.float(), dim=-1)
    if mixture_coef == 1:
        return F.log_softmax(ref_logits.float(), dim=-1)
    mixed = ((1 - mixture_coef) * F.log_softmax(logits.float(), dim=-1)
             + mixture_coef * F.log_softmax(ref_logits.float(), dim=-1))
    return F.log_softmax(mixed, dim=-1)


@_term("sppo_square", "per completion")
def sppo_square(logps: Tensor, old_logps: Tensor, win_prob: Tensor, *, eta: float) -> Tensor:
    """SPPO: (log π_θ(y) − log π_t(y) − η·(P̂(y ≻ π_t) − ½))².

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment": π_t is the
    policy that sampled y (frozen for the round), P̂(y ≻ π_t) its estimated win probability
    against π_t's own samples, and log Z is approximated by η/2. A sample that wins more than
    half the time is pushed up, one that loses pushed down — unlike DPO, each log-likelihood
    moves on its own, not only their difference."""
    if eta <= 0:
        raise ValueError(f"sppo_square: eta must be > 0, got {eta}")
    return (logps - old_logps - eta * (win_prob - 0.5)).square()


def _clipped(ratio: Tensor, advantages: Tensor, clip_eps: float) -> Tensor:
    """−min(ρ·A, clip(ρ, 1−ε, 1+ε)·A): PPO's pessimistic surrogate, as a loss."""
    return -torch.minimum(ratio * advantages,
                          ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)


def _check_eps(name: str, clip_eps: float) -> None:
    if not 0 < clip_eps < 1:
        raise ValueError(f"{name}: clip_eps must be in (0, 1), got {clip_eps}")


@_term("p3o_joint", "per pair")
def p3o_joint(logps: Tensor, old_logps: Tensor, advantages: Tensor, *,
              clip_eps: float = 0.2) -> Tensor:
    """P3O with joint clipping on a pair (y₁, y₂) ~ π_old (``logps``/``old_logps`` ``[B, 2]``):

        −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A),  ρ = π_θ(y₁)·π_old(y₂) / (π_old(y₁)·π_θ(y₂)),

    A = (r₁ − r₂)/2 the pair's relative reward (``advantages [B]``). At θ = θ_old its gradient is
    the pairwise policy gradient −A·∇(log π(y₁) − log π(y₂)) of Wu et al. 2023, "Pairwise Proximal
    Policy Optimization: Harnessing Relative Feedback for LLM Alignment"; a shift of both rewards
    changes nothing (the paper's reward-equivalence invariance)."""
    _check_eps("p3o_joint", clip_eps)
    log_ratio = (logps[:, 0] - old_logps[:, 0]) - (logps[:, 1] - old_logps[:, 1])
    return _clipped(torch.exp(log_ratio.clamp(max=20.0)), advantages, clip_eps)


@_term("p3o_separate", "per pair")
def p3o_separate(logps: Tensor, old_logps: Tensor, advantages: Tensor, *,
                 clip_eps: float = 0.2) -> Tensor:
    """P3O with separate clipping: each completion's own ratio ρᵢ = π_θ(yᵢ)/π_old(yᵢ) clipped
    with the pair's advantage, +A for y₁ and −A for y₂:

        −min(ρ₁·A, clip(ρ₁)·A) − min(ρ₂·(−A), clip(ρ₂)·(−A)).

    Wu et al. 2023, "Pairwise Proximal Policy Optimization" (its two clipping variants); the
    same gradient as ``p3o_joint`` at θ = θ_old."""
    _check_eps("p3o_separate", clip_eps)
    ratio = torch.exp((logps - old_logps).clamp(max=20.0))
    return (_clipped(ratio[:, 0], advantages, clip_eps)
            + _clipped(ratio[:, 1], -advantages, clip_eps))


def _pair_margin(logps: Tensor, base_logps: Tensor) -> Tensor:
    """(log π(y₁) − log π_b(y₁)) − (log π(y₂) − log π_b(y₂)) of pairs laid out ``[B, 2]``."""
    return (logps[:, 0] - base_logps[:, 0]) - (logps[:, 1] - base_logps[:, 1])


@_term("inpo_square", "per pair")
def inpo_square(logps: Tensor, old_logps: Tensor, ref_logps: Tensor, preference: Tensor, *,
                eta: float, tau: float) -> Tensor:
    """INPO's loss on a pair (y₁, y₂) ~ π_t (``[B, 2]`` log-probs under π_θ, π_t, π_ref):

        h = log π_θ(y₁)/π_θ(y₂) − ητ·log π_ref(y₁)/π_ref(y₂) − (1 − ητ)·log π_t(y₁)/π_t(y₂)
        P·(h − η/2)² + (1 − P)·(−h − η/2)²,   P = P(y₁ ≻ y₂)

    Zhang et al. 2024, "Iterative Nash Policy Optimization: Aligning LLMs with General
    Preferences via No-Regret Learning": L_t(π) = E[(h_t(π, y_w, y_l) − η/2)²] over pairs from
    π_t ordered by the preference oracle, h_t(π, y_w, y_l) = −h_t(π, y_l, y_w); the expectation
    over the oracle's label is taken exactly here (a hard label P ∈ {0, 1} is the paper's
    sampled loss). Its minimiser is the online-mirror-descent step on the KL-regularised game,
    π_{t+1} ∝ π_t^(1−ητ)·π_ref^(ητ)·exp(η·P(y ≻ π_t)), without estimating any win rate. η is the
    step size, τ the KL coefficient (ητ ≤ 1: π_t's exponent stays ≥ 0)."""
    if eta <= 0 or tau < 0 or eta * tau > 1:
        raise ValueError(f"inpo_square: need eta > 0, tau >= 0 and eta*tau <= 1, got eta={eta}, "
                         f"tau={tau}")
    h = ((logps[:, 0] - logps[:, 1]) - eta * tau * (ref_logps[:, 0] - ref_logps[:, 1])
         - (1 - eta * tau) * (old_logps[:, 0] - old_logps[:, 1]))
    return preference * (h - eta / 2).square() + (1 - preference) * (h + eta / 2).square()


@_term("dno_regression", "per pair")
def dno_regression(logps: Tensor, old_logps: Tensor, label: Tensor, *, eta: float) -> Tensor:
    """DNO's contrastive regression on a pair (y₁, y₂) (``[B, 2]``), π_t the policy that sampled
    them:

        −[L·log σ(η·m) + (1 − L)·log σ(−η·m)],  m = log π_θ(y₁)/π_t(y₁) − log π_θ(y₂)/π_t(y₂)

    Rosset et al. 2024, "Direct Nash Optimization: Teaching Language Models to Self-Improve with
    General Preferences": Algorithm 1 regresses onto the soft label L = σ(r_t(y₁) − r_t(y₂)),
    r_t(y) = P(y ≻ π_t) the win rate against π_t's own samples; DNO-Prct (Algorithm 2) takes
    L = 1 on the best-vs-worst pair (y⁺, y⁻), i.e. DPO with π_t — not the SFT model — as the
    reference of the iteration."""
    if eta <= 0:
        raise ValueError(f"dno_regression: eta must be > 0, got {eta}")
    m = eta * _pair_margin(logps, old_logps)
    return -(label * F.logsigmoid(m) + (1 - label) * F.logsigmoid(-m))


@_term("online_ipo", "per pair")
def online_ipo(logps: Tensor, ref_logps: Tensor, win_margin: Tensor, *, kl_coef: float) -> Tensor:
    """Online IPO on a pair (y₁, y₂) (``[B, 2]``), the loss whose gradient EGPO's extragradient
    steps follow:

        (log π_θ(y₁)/π_ref(y₁) − log π_θ(y₂)/π_ref(y₂) − Δ/τ)²,  Δ ≈ P(y₁ ≻ π_s) − P(y₂ ≻ π_s)

    Zhou et al. 2025, "Extragradient Preference Optimization (EGPO): Beyond Last-Iterate
    Convergence for Nash Learning from Human Feedback": π_s is the policy the step evaluates the
    game at (π_t for the extrapolation step, π_{t+1/2} for the update); Δ is estimated from a
    judge, either P(y₁ ≻ y₂) − ½ on the pair itself (the released code's lower-variance form,
    y₂ standing in for the opponent) or the difference of the two samples' round-robin win
    rates. τ is the KL coefficient; IPO's hard-label target 1/(2τ) is the case Δ = ½."""
    if kl_coef <= 0:
        raise ValueError(f"online_ipo: kl_coef must be > 0, got {kl_coef}")
    return (_pair_margin(logps, ref_logps) - win_margin / kl_coef).square()


__all__ = ["ONLINE_PREFERENCE_TERMS", "dno_regression", "geometric_mixture", "inpo_square",
           "nash_md_pg", "online_ipo", "p3o_joint", "p3o_separate", "selm_optimism",
           "sppo_square", "vpo_value", "xpo_exploration"]
