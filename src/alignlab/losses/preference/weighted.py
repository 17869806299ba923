"""DPO with weights: per pair (WPO, group-robust), per token (SparsePO) or per reference (MRPO).

Each reduces to DPO when its weights are uniform, which the tests check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlab.losses.preference.base import (
    LossResult,
    PreferenceInputs,
    implicit_rewards,
    mean_logps,
    paired_result,
    preference_loss,
)
from alignlab.losses.preference.pairwise import PAIR, dpo_logits


@preference_loss("wpo", kind="paired", requires=(*PAIR, "chosen_lengths", "rejected_lengths"))
def wpo(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """WPO: w·DPO with w = sg[exp(π_c/|y_c|)·exp(π_r/|y_r|)], the pair's per-token geometric
    mean probability under the current policy (pairs the policy would sample weigh more).

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization". This is the
    paper's plain weighting; its "aligned" variant normalises each token by Σ_v π(v)², which
    needs the full vocabulary and so belongs in the log-prob code, not in a loss."""
    weights = torch.exp(mean_logps(inputs.chosen_logps, inputs.chosen_lengths)
                        + mean_logps(inputs.rejected_logps, inputs.rejected_lengths)).detach()
    losses = weights * -F.logsigmoid(dpo_logits(inputs, beta))
    return paired_result(losses, *implicit_rewards(inputs, beta), **{"wpo/weight": weights.mean()})


TOKENS = ("chosen_token_logps", "rejected_token_logps", "ref_chosen_token_logps",
          "ref_rejected_token_logps", "chosen_mask", "rejected_mask")


@preference_loss("sparse_po", "token_weighted_dpo", kind="paired", requires=TOKENS,
                 optional=("chosen_token_weights", "rejected_token_weights"))
def sparse_po(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """Token-weighted DPO: −log σ(β·(Σ_t m_t^c·w_t^c·(π−ref)_t^c − Σ_t m_t^r·w_t^r·(π−ref)_t^r)).

    Christopoulou et al. 2024, "SparsePO: Controlling Preference Alignment of LLMs via Sparse
    Token Masks". Here the token weights w are inputs (from the reference model's activations
    or a learned mask head computed by the caller; gradients flow into them if they require
    grad); one shared mask weighs reward and KL. Weights of 1 give DPO."""
    def reward(logps: Tensor, ref: Tensor, mask: Tensor, weights: Tensor | None) -> Tensor:
        w = mask.to(logps.dtype) if weights is None else mask.to(logps.dtype) * weights
        return (w * (logps - ref)).sum(-1)

    a = reward(inputs.chosen_token_logps, inputs.ref_chosen_token_logps, inputs.chosen_mask,
               inputs.chosen_token_weights)
    b = reward(inputs.rejected_token_logps, inputs.ref_rejected_token_logps, inputs.rejected_mask,
               inputs.rejected_token_weights)
    losses = -F.logsigmoid(beta * (a - b))
    return paired_result(losses, beta * a.detach(), beta * b.detach())


def _shared_and_tail(logps: Tensor, mask: Tensor, shared_len: Tensor) -> tuple[Tensor, Tensor]:
    """Sums of ``logps`` over a completion's first ``shared_len`` tokens and over the rest."""
    m = mask.bool()
    position = m.long().cumsum(-1)  # 1-based index among completion tokens
    zero = torch.zeros_like(logps)
    shared = torch.where(m & (position <= shared_len[:, None]), logps, zero).sum(-1)
    tail = torch.where(m & (position > shared_len[:, None]), logps, zero).sum(-1)
    return shared, tail


@preference_loss("ld_dpo", kind="paired", requires=TOKENS)
def ld_dpo(inputs: PreferenceInputs, *, beta: float = 0.1, alpha: float = 0.5) -> LossResult:
    """LD-DPO: DPO whose log-probs count the longer answer's tail (past the shorter's length) × α.

    Liu et al. 2024, "Length Desensitization in Direct Preference Optimization" (LD-DPO):
    log π̂(y) = Σ_{t≤l_p} log π(y_t) + α·Σ_{t>l_p} log π(y_t) with l_p = min(|y_c|, |y_r|), for
    policy and reference alike, so the verbose tail moves the margin less. α ∈ [0, 1]; α = 1 is
    DPO. TRL's ``ld_alpha``; 0.5 is the paper's suggested start (the best α depends on the model)."""
    shared_len = torch.minimum(inputs.chosen_mask.bool().sum(-1), inputs.rejected_mask.bool().sum(-1))

    def log_ratio(logps: Tensor, ref: Tensor, mask: Tensor) -> Tensor:
        shared, tail = _shared_and_tail(logps - ref, mask, shared_len)
        return shared + alpha * tail

    a = log_ratio(inputs.chosen_token_logps, inputs.ref_chosen_token_logps, inputs.chosen_mask)
    b = log_ratio(inputs.rejected_token_logps, inputs.ref_rejected_token_logps, inputs.rejected_mask)
    losses = -F.logsigmoid(beta * (a - b))
    return paired_result(losses, beta * a.detach(), beta * b.detach())


MULTI = ("chosen_logps", "rejected_logps", "ref_chosen_logps_multi", "ref_rejected_logps_multi")


@preference_loss("mrpo", kind="paired", requires=MULTI)
def mrpo(inputs: PreferenceInputs, *, beta: float = 0.1, ref_weights: list[float] | Tensor | None = None,
         clip: float | None = None) -> LossResult:
    """MRPO: DPO against the weighted geometric mixture of M references,
    ref = Σ_k α_k·ref_k (log space), the closed-form optimum of Σ_k α_k·KL(π ‖ ref_k).

    Le et al. 2024, "Multi-Reference Preference Optimization for Large Language Models".
    Column 0 is the main reference; ``clip`` bounds the other references' log-probs to
    ref_0 ± clip so a disagreeing reference cannot dominate (the paper's clipped trust region).
    α defaults to uniform."""
    ref_c, ref_r = inputs.ref_chosen_logps_multi, inputs.ref_rejected_logps_multi
    if clip is not None:
        ref_c = torch.cat([ref_c[:, :1], torch.clamp(ref_c[:, 1:], ref_c[:, :1] - clip,
                                                     ref_c[:, :1] + clip)], dim=1)
        ref_r = torch.cat([ref_r[:, :1], torch.clamp(ref_r[:, 1:], ref_r[:, :1] - clip,
                                                     ref_r[:, :1] + clip)], dim=1)
    m = ref_c.shape[1]
    alpha = (torch.full((m,), 1.0 / m, device=ref_c.device) if ref_weights is None
             else torch.as_tensor(ref_weights, dtype=torch.float32))
    if alpha.numel() != m:
        raise ValueError(f"mrpo: {alpha.numel()} ref_weights for {m} reference models")
    alpha = (alpha.to(ref_c) / alpha.sum().to(ref_c))
    a = inputs.chosen_logps - ref_c @ alpha
    b = inputs.rejected_logps - ref_r @ alpha
    losses = -F.logsigmoid(beta * (a - b))
    return paired_result(losses, beta * a.detach(), beta * b.detach())


@preference_loss("group_robust_dpo", kind="paired", requires=(*PAIR, "groups"))
def group_robust_dpo(inputs: PreferenceInputs, *, beta: float = 0.1,
                     group_weights: Tensor | None = None) -> LossResult:
    """Group-robust DPO: example i of group g weighs G·α_g·DPO_i (α on the simplex), so
    groups with a worse loss get more weight; uniform α gives DPO.

    Ramesh et al. 2024, "Group Robust Preference Optimization in Reward-free RLHF". The trainer
    keeps α and updates it with ``update_group_weights`` from ``metrics['group/losses']``."""
    groups = inputs.groups.long()
    dpo_losses = -F.logsigmoid(dpo_logits(inputs, beta))
    n_groups = int(groups.max()) + 1 if group_weights is None else group_weights.numel()
    alpha = (torch.full((n_groups,), 1.0 / n_groups, device=groups.device) if group_weights is None
             else group_weights / group_weights.sum()).to(dpo_losses)
    losses = n_groups * alpha.detach()[groups] * dpo_losses
    sums = dpo_losses.new_zeros(n_groups).index_add(0, groups, dpo_losses.detach())
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1)
    return paired_result(losses, *implicit_rewards(inputs, beta), **{"group/losses": sums / counts})


def update_group_weights(weights: Tensor, group_losses: Tensor, step_size: float = 0.01) -> Tensor:
    """Exponentiated-gradient step of the group-robust objective: α_g ∝ α_g·exp(η·L_g)."""
    new = weights * torch.exp(step_size * group_losses.to(weights))
    return new / new.sum()
