"""Unpaired losses: one completion per example with a thumbs-up/down label (or a scalar reward).

Notation: r = π − ref (sequence log-prob sums), rewards β·r. ``chosen_rewards`` of the result are
the desirable examples' rewards and ``rejected_rewards`` the undesirable ones'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlab.losses.preference.base import (
    LossResult,
    PreferenceInputs,
    preference_loss,
    smoothed_sigmoid_loss,
)

UNPAIRED = ("logps", "ref_logps", "labels")


def _unpaired_result(losses: Tensor, rewards: Tensor, labels: Tensor, **metrics: Tensor) -> LossResult:
    rewards = rewards.detach()
    out = {k: v.detach() for k, v in metrics.items()}
    out["rewards/mean"] = rewards.mean()
    if labels.any():
        out["rewards/chosen"] = rewards[labels].mean()
    if (~labels).any():
        out["rewards/rejected"] = rewards[~labels].mean()
    return LossResult(losses, rewards[labels], rewards[~labels], out)


@preference_loss("kto", kind="unpaired", requires=UNPAIRED, optional=("kl_ref",))
def kto(inputs: PreferenceInputs, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> LossResult:
    """KTO: λ_D·(1 − σ(β(r − z₀))) for desirable, λ_U·(1 − σ(β(z₀ − r))) for undesirable outputs.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization". z₀ is
    ``kl_ref``, the batch estimate of KL(π ‖ ref) the trainer computes from mismatched
    prompt/completion pairs (detached, clamped at 0); None means z₀ = 0."""
    labels = inputs.labels.bool()
    r = inputs.logps - inputs.ref_logps
    z0 = (r.new_zeros(()) if inputs.kl_ref is None
          else torch.as_tensor(inputs.kl_ref, dtype=r.dtype, device=r.device).detach().clamp(min=0))
    losses = torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return _unpaired_result(losses, beta * r, labels, kl=z0)


@preference_loss("bco", kind="unpaired", requires=UNPAIRED)
def bco(inputs: PreferenceInputs, *, beta: float = 0.1,
        reward_shift: float | Tensor = 0.0) -> LossResult:
    """BCO: a binary classifier on the implicit reward, −log σ(βr − δ) for desirable and
    −log σ(−(βr − δ)) for undesirable outputs; δ is the mean of βr seen so far.

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment". The
    preference trainer keeps δ as the cumulative mean of every βr of training so far (TRL's
    ``RunningMoments``; the paper's "moving average" fixes no decay), saves it for resume and
    passes it as ``reward_shift``. (The paper's density-ratio matching of prompts needs an
    embedding model and is left out.)"""
    labels = inputs.labels.bool()
    rewards = beta * (inputs.logps - inputs.ref_logps)
    logits = rewards - reward_shift
    losses = torch.where(labels, -F.logsigmoid(logits), -F.logsigmoid(-logits))
    return _unpaired_result(losses, rewards, labels)


@preference_loss("apo_zero_unpaired", kind="unpaired", requires=UNPAIRED)
def apo_zero_unpaired(inputs: PreferenceInputs, *, beta: float = 0.1, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> LossResult:
    """APO-zero, unpaired: λ_D·(1 − σ(βr)) for desirable and λ_U·σ(βr) for undesirable outputs.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions:
    Addressing Underspecification in Alignment" (``apo_zero`` with the pair split into its two
    labelled halves; TRL's KTOTrainer ``apo_zero_unpaired``): raise desirable and lower
    undesirable likelihoods, anchored at the reference, with no KL reference point."""
    labels = inputs.labels.bool()
    r = inputs.logps - inputs.ref_logps
    losses = torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * r)),
                         undesirable_weight * torch.sigmoid(beta * r))
    return _unpaired_result(losses, beta * r, labels)


@preference_loss("aot_unpaired", kind="unpaired", requires=UNPAIRED)
def aot_unpaired(inputs: PreferenceInputs, *, beta: float = 0.1,
                 label_smoothing: float = 0.0) -> LossResult:
    """AOT (unpaired): −log σ(β·(Q_D(q) − Q_U(q))) over quantiles q, where Q_D, Q_U are the
    quantile functions of r on desirable and undesirable outputs (first-order stochastic
    dominance of the desirable reward distribution, solved by sorting = 1-D optimal transport).

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport".
    With unequal counts both sides are read at the min(n_D, n_U) mid-quantiles (q = (i+½)/n);
    ``losses`` has one entry per quantile, not per input. On paired data the same objective is
    ``aot_unpaired_on_pairs`` (TRL's DPO ``aot_unpaired``); the paired form is ``aot_paired``."""
    labels = inputs.labels.bool()
    r = inputs.logps - inputs.ref_logps
    good, bad = r[labels], r[~labels]
    if good.numel() == 0 or bad.numel() == 0:
        raise ValueError("aot_unpaired needs both desirable and undesirable examples in the batch")
    n = min(good.numel(), bad.numel())
    if good.numel() == bad.numel():
        qg, qb = torch.sort(good).values, torch.sort(bad).values
    else:
        q = (torch.arange(n, dtype=r.dtype, device=r.device) + 0.5) / n
        qg, qb = _quantiles(good, q), _quantiles(bad, q)
    losses = smoothed_sigmoid_loss(beta * (qg - qb), label_smoothing)
    return _unpaired_result(losses, beta * r, labels)


def _quantiles(x: Tensor, q: Tensor) -> Tensor:
    """``torch.quantile`` (linear interpolation) that also runs in bf16/fp16."""
    xs = torch.sort(x).values
    pos = q * (xs.numel() - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=xs.numel() - 1)
    frac = (pos - lo.to(pos.dtype)).to(xs.dtype)
    return xs[lo] + (xs[hi] - xs[lo]) * frac


@preference_loss("dro_pointwise", "dro", kind="unpaired", requires=("logps", "ref_logps", "rewards"),
                 optional=("values",))
def dro_pointwise(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """DRO: ½·(reward − V(x) − β·(π − ref))², regress the implicit reward onto the observed
    reward's advantage over the prompt's value.

    Richemond et al. 2024, "Offline Regularised Reinforcement Learning for Large Language Models
    Alignment". ``values`` is V(x) (0 if None); when it requires grad the same squared loss
    trains the value head too, as in the paper's joint objective."""
    r = inputs.logps - inputs.ref_logps
    values = torch.zeros_like(r) if inputs.values is None else inputs.values
    residual = inputs.rewards.to(r.dtype) - values - beta * r
    losses = 0.5 * residual**2
    labels = inputs.rewards > (values.detach() if isinstance(values, Tensor) else values)
    return _unpaired_result(losses, beta * r, labels, **{"dro/residual": residual.abs().mean()})
