"""Listwise losses: K completions per prompt with scores (higher is better), shapes [B, K].

``list_mask`` marks real items when lists have different lengths (padding items are ignored).
``chosen_rewards`` of the result is the implicit reward of each list's best-scored item and
``rejected_rewards`` that of its worst.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlab.losses.preference.base import (
    LossResult,
    PreferenceInputs,
    mean_logps,
    preference_loss,
)

LIST = ("list_logps", "ref_list_logps", "scores")


def _mask(inputs: PreferenceInputs) -> Tensor:
    if inputs.list_mask is None:
        return torch.ones_like(inputs.list_logps, dtype=torch.bool)
    return inputs.list_mask.bool()


def _listwise_result(losses: Tensor, rewards: Tensor, scores: Tensor, mask: Tensor,
                     **metrics: Tensor) -> LossResult:
    rewards = rewards.detach()
    best = scores.masked_fill(~mask, float("-inf")).argmax(-1, keepdim=True)
    worst = scores.masked_fill(~mask, float("inf")).argmin(-1, keepdim=True)
    chosen, rejected = rewards.gather(-1, best)[:, 0], rewards.gather(-1, worst)[:, 0]
    out = {k: v.detach() for k, v in metrics.items()}
    out.update({"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                "rewards/margins": (chosen - rejected).mean(),
                "rewards/accuracies": (chosen > rejected).float().mean()})
    return LossResult(losses, chosen, rejected, out)


@preference_loss("lipo_lambda", kind="listwise", requires=LIST, optional=("list_mask",))
def lipo_lambda(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """LiPO-λ: −Σ_{ψ_i > ψ_j} Δ_ij·log σ(s_i − s_j), s = β·(π − ref), with the LambdaLoss weight
    Δ_ij = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)|, G = 2^ψ − 1, D(τ) = log2(1 + τ), τ = rank by s.

    Liu et al. 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank". Ranks
    come from the current (detached) implicit rewards, so pairs the model orders wrongly near
    the top weigh most. With K = 2 it is DPO scaled by a constant."""
    mask = _mask(inputs)
    s = beta * (inputs.list_logps - inputs.ref_list_logps)
    psi = inputs.scores.to(s.dtype)
    # rank 1 = highest implicit reward; padding items sort last and are masked out of pairs
    order = s.detach().masked_fill(~mask, float("-inf")).argsort(-1, descending=True)
    ranks = order.argsort(-1).to(s.dtype) + 1
    gain = torch.pow(2.0, psi) - 1
    inv_discount = 1 / torch.log2(1 + ranks)
    delta = (gain[:, :, None] - gain[:, None, :]).abs() * (
        inv_discount[:, :, None] - inv_discount[:, None, :]).abs()
    pairs = (psi[:, :, None] > psi[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    pair_losses = -F.logsigmoid(s[:, :, None] - s[:, None, :])
    losses = (delta * pair_losses).masked_fill(~pairs, 0).sum((-1, -2))
    return _listwise_result(losses, s, psi, mask, **{"lipo/pairs": pairs.sum((-1, -2)).float().mean()})


@preference_loss("pro", kind="listwise", requires=("list_logps", "scores", "list_lengths"),
                 optional=("list_mask",))
def pro(inputs: PreferenceInputs, *, sft_weight: float = 0.05,
        dynamic_temperature: bool = True) -> LossResult:
    """PRO: Plackett-Luce over the ranking y¹ ≻ … ≻ yⁿ of the length-normalised log-probs
    r = π/|y|, −Σ_{k<n} log [exp(r_k/T_k^k) / Σ_{i≥k} exp(r_i/T_k^i)], plus sft_weight·(−r_1).

    Song et al. 2023, "Preference Ranking Optimization for Human Alignment". Reference-free.
    With ``dynamic_temperature`` 1/T_k^i = score_k − score_i (i > k) and 1/T_k^k = max_i 1/T_k^i,
    so candidates far below y^k in score are pushed away harder; otherwise T = 1."""
    mask = _mask(inputs)
    r = mean_logps(inputs.list_logps, inputs.list_lengths)
    scores = inputs.scores.to(r.dtype)
    order = scores.masked_fill(~mask, float("-inf")).argsort(-1, descending=True)
    r, scores, mask = r.gather(-1, order), scores.gather(-1, order), mask.gather(-1, order)
    k_items = r.shape[-1]
    losses = r.new_zeros(r.shape[0])
    for k in range(k_items - 1):
        rest = mask[:, k:].clone()
        if dynamic_temperature:
            scale = (scores[:, k:k + 1] - scores[:, k:]).clamp(min=0)
            top = scale[:, 1:].masked_fill(~rest[:, 1:], 0).amax(-1, keepdim=True)
            scale = torch.cat([top, scale[:, 1:]], dim=-1)
        else:
            scale = torch.ones_like(r[:, k:])
        logits = (r[:, k:] * scale).masked_fill(~rest, float("-inf"))
        term = -(logits[:, 0] - torch.logsumexp(logits, -1))
        active = rest[:, 0] & rest[:, 1:].any(-1)
        losses = losses + torch.where(active, term, torch.zeros_like(term))
    nll = -r[:, 0]
    losses = losses + sft_weight * nll
    return _listwise_result(losses, r, scores, mask, **{"pro/nll": nll.mean()})


@preference_loss("spo_degree", kind="listwise", requires=LIST, optional=("list_mask",))
def spo_degree(inputs: PreferenceInputs, *, beta: float = 0.1, temperature: float = 1.0) -> LossResult:
    """Preference-degree loss: −Σ_k q_k·log softmax(β·(π − ref))_k with q = softmax(degree/τ),
    ``scores`` holding each item's preference degree.

    Li et al. 2024, "Self-supervised Preference Optimization: Enhance Your Language Model with
    Preference Degree Awareness". The paper builds K variants of a response by removing
    increasing amounts of its key content and trains the model to recognise each variant's
    degree, added to an alignment loss (``combine_losses``). The exact classifier is not
    reproduced here: this is a documented variant that asks the implicit rewards to order
    the variants like their degrees (a ListNet cross-entropy), which is a well-defined,
    tensor-only loss on the same data."""
    mask = _mask(inputs)
    s = beta * (inputs.list_logps - inputs.ref_list_logps)
    degree = inputs.scores.to(s.dtype)
    target = torch.softmax((degree / temperature).masked_fill(~mask, float("-inf")), -1)
    log_probs = torch.log_softmax(s.masked_fill(~mask, float("-inf")), -1)
    losses = -(target * log_probs.masked_fill(~mask, 0)).sum(-1)
    return _listwise_result(losses, s, degree, mask)
