"""Policy-gradient losses for online RL and the aggregation of per-token losses.

A policy loss in ``POLICY_LOSSES`` is called with keywords ``logprobs``, ``old_logprobs``,
``advantages``, ``mask`` (all ``[B,T]``, padded, one sequence per row) plus its
hyper-parameters, and returns ``PolicyLossOutput(per_token_loss [B,T], metrics)``: the loss of
every completion token (0 outside ``mask``) and detached scalar metrics (masked means over the
batch it was given). Optional terms shared by all of them:

- ``rollout_logprobs``: the sampler's log-probs of the same tokens; the policy-gradient term is
  then weighted per token by TIS/MIS weights from exp(old − rollout) (``rollout_correction``,
  see ``losses/rollout_correction.py``), the mismatch logged as ``rollout_is/*`` metrics;
- a KL-to-reference loss ``kl_coef · KL_est(π‖π_ref)`` (GRPO style, estimator from
  ``alignlab.losses.kl``), not importance-weighted;
- an entropy bonus ``−entropy_coef · H_t`` (``entropy [B,T]`` computed by the model side),
  added to every token's loss *before* aggregation, so it is averaged exactly like the policy
  term. TRL's GRPO instead subtracts ``coef ·`` (token-mean entropy) after aggregation: the same
  under ``token_mean``, weighted differently under ``seq_mean_token_mean`` and ``dr_grpo``.

``aggregate(per_token_loss, mask, mode) -> (loss_sum, num_items)`` turns it into the training
loop's contract: the loop divides the *sum* of the micro-batches' ``loss_sum`` by their *total*
``num_items``, which for every mode equals the full-batch loss and gradient (see the tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alignlab.core.errors import ConfigError
from alignlab.core.registry import Registry
from alignlab.losses.advantages import masked_mean
from alignlab.losses.kl import LOG_RATIO_CLAMP, token_kl
from alignlab.losses.rollout_correction import RolloutCorrection, rollout_correction

POLICY_LOSSES: Registry = Registry("policy loss")
LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")
TIS = RolloutCorrection()


class PolicyLossOutput(NamedTuple):
    per_token_loss: Tensor
    metrics: dict[str, Tensor]


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    # where, not multiply: a NaN/inf on a padding position must not leak into the sum.
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def _finish(loss: Tensor, metrics: dict[str, Tensor], logprobs: Tensor, old_logprobs: Tensor | None,
            mask: Tensor, rollout_logprobs: Tensor | None, correction: RolloutCorrection,
            ref_logprobs: Tensor | None, kl_coef: float, kl_estimator: str,
            entropy: Tensor | None, entropy_coef: float) -> PolicyLossOutput:
    """Weight the policy-gradient term by the rollout correction, then add KL and entropy."""
    if rollout_logprobs is not None:
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        weights, is_metrics = rollout_correction(old, rollout_logprobs, mask, correction)
        loss = loss * weights
        metrics.update(is_metrics)
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference model's log-probs)")
    if ref_logprobs is not None:
        kl = token_kl(logprobs, ref_logprobs, kl_estimator)
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if kl_coef:
            loss = loss + kl_coef * kl
    if entropy_coef and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy [B,T] (per-token policy entropy)")
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.detach(), mask)
        if entropy_coef:
            loss = loss - entropy_coef * entropy
    return PolicyLossOutput(_masked(loss, mask), metrics)


def _ratio(log_ratio: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """ρ = exp(log ρ) (clamped) and its metrics: mean ρ and CleanRL's approx_kl."""
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    with torch.no_grad():
        metrics = {
            "ratio_mean": masked_mean(ratio, mask),
            # k3 estimate of KL(π_old‖π) from tokens sampled by π_old (CleanRL's approx_kl).
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
        }
    return ratio, metrics


def _clipped_surrogate(log_ratio: Tensor, advantages: Tensor, mask: Tensor, clip_eps_low: float,
                       clip_eps_high: float | None, dual_clip_c: float | None
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), capped at −c·A where A < 0 if c is given."""
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    ratio, metrics = _ratio(log_ratio, mask)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        is_clipped = clipped > unclipped
        metrics.update({
            "clip_fraction": masked_mean(is_clipped.float(), mask),
            "clip_fraction_low": masked_mean((is_clipped & (ratio < 1)).float(), mask),
            "clip_fraction_high": masked_mean((is_clipped & (ratio > 1)).float(), mask),
        })
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ConfigError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        negative = advantages < 0
        cap = -dual_clip_c * advantages
        with torch.no_grad():
            metrics["dual_clip_fraction"] = masked_mean((negative & (loss > cap)).float(), mask)
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    return loss, metrics


@POLICY_LOSSES.register("ppo_clip", "ppo")
def ppo_clip(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
             clip_eps_low: float = 0.2, clip_eps_high: float | None = None,
             dual_clip_c: float | None = None, *, rollout_logprobs: Tensor | None = None,
             rollout_correction: RolloutCorrection = TIS, ref_logprobs: Tensor | None = None,
             kl_coef: float = 0.0, kl_estimator: str = "k3", entropy: Tensor | None = None,
             entropy_coef: float = 0.0) -> PolicyLossOutput:
    """PPO clipped surrogate: ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε_low, 1+ε_high)).

    Schulman et al. 2017; ρ_t = π(y_t)/π_old(y_t). ``clip_eps_high`` > ε_low is DAPO's
    clip-higher (Yu et al. 2025, "DAPO: An Open-Source LLM RL System at Scale"); ``dual_clip_c``
    caps the loss at −c·A_t for A_t < 0 (dual-clip PPO, Ye et al. 2020). GRPO (Shao et al. 2024)
    is this with group advantages, ``kl_coef`` > 0 and the k3 estimator.
    """
    loss, metrics = _clipped_surrogate(logprobs - old_logprobs, advantages, mask, clip_eps_low,
                                       clip_eps_high, dual_clip_c)
    return _finish(loss, metrics, logprobs, old_logprobs, mask, rollout_logprobs,
                   rollout_correction, ref_logprobs, kl_coef, kl_estimator, entropy, entropy_coef)


@POLICY_LOSSES.register("gspo")
def gspo(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
         clip_eps_low: float = 3e-4, clip_eps_high: float | None = 4e-4,
         dual_clip_c: float | None = None, *, rollout_logprobs: Tensor | None = None,
         rollout_correction: RolloutCorrection = TIS, ref_logprobs: Tensor | None = None,
         kl_coef: float = 0.0, kl_estimator: str = "k3", entropy: Tensor | None = None,
         entropy_coef: float = 0.0) -> PolicyLossOutput:
    """GSPO: PPO clipping on the sequence ratio s_i = exp(mean_t log ρ_it), applied to all tokens.

    Zheng et al. 2025, "Group Sequence Policy Optimization".
    ℓ_it = max(−A_it s_it, −A_it clip(s_it, 1−ε_low, 1+ε_high)) with the GSPO-token ratio
    s_it = sg[s_i]·π(y_it)/sg[π(y_it)]: its value is s_i (the clip decision is per sequence) and,
    for a sequence-level advantage, its gradient equals the sequence-level GSPO gradient. The
    paper's defaults ε = 3e-4 / 4e-4 and ``seq_mean_token_mean`` aggregation.
    """
    seq_log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=-1)
    token_log_ratio = seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach()
    loss, metrics = _clipped_surrogate(token_log_ratio, advantages, mask, clip_eps_low,
                                       clip_eps_high, dual_clip_c)
    has_tokens = mask.bool().any(dim=-1)
    metrics["seq_ratio_mean"] = masked_mean(seq_log_ratio.detach().exp(), has_tokens)
    return _finish(loss, metrics, logprobs, old_logprobs, mask, rollout_logprobs,
                   rollout_correction, ref_logprobs, kl_coef, kl_estimator, entropy, entropy_coef)


@POLICY_LOSSES.register("cispo")
def cispo(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
          clip_eps_low: float | None = None, clip_eps_high: float | None = 4.0, *,
          rollout_logprobs: Tensor | None = None, rollout_correction: RolloutCorrection = TIS,
          ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
          entropy: Tensor | None = None, entropy_coef: float = 0.0) -> PolicyLossOutput:
    """CISPO: ℓ_t = −sg[clip(ρ_t, 1−ε_low, 1+ε_high)]·A_t·log π(y_t), clipping the IS weight.

    MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention".
    Unlike PPO no token loses its gradient: the clipped weight only scales it. ``None`` leaves
    that side unbounded; the defaults (no lower bound, cap 1+ε_high = 5) are the paper's
    one-sided clip with TRL's recommended cap ε_max = 5 (from ScaleRL). Use ``token_mean``
    aggregation, as the paper does. The value is −w·A·log π, not a surrogate of the return.
    """
    ratio, metrics = _ratio(logprobs.detach() - old_logprobs, mask)
    low = 0.0 if clip_eps_low is None else 1.0 - clip_eps_low
    high = None if clip_eps_high is None else 1.0 + clip_eps_high
    weight = ratio.clamp(low, high)
    with torch.no_grad():
        metrics["clip_fraction"] = masked_mean((weight != ratio).float(), mask)
    loss = -weight * advantages * logprobs
    return _finish(loss, metrics, logprobs, old_logprobs, mask, rollout_logprobs,
                   rollout_correction, ref_logprobs, kl_coef, kl_estimator, entropy, entropy_coef)


@POLICY_LOSSES.register("sapo")
def sapo(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
         tau_pos: float = 1.0, tau_neg: float = 1.05, *, rollout_logprobs: Tensor | None = None,
         rollout_correction: RolloutCorrection = TIS, ref_logprobs: Tensor | None = None,
         kl_coef: float = 0.0, kl_estimator: str = "k3", entropy: Tensor | None = None,
         entropy_coef: float = 0.0) -> PolicyLossOutput:
    """SAPO: ℓ_t = −(4/τ)·σ(τ(ρ_t − 1))·A_t, a soft gate instead of PPO's hard clip.

    Gao et al. 2025 (Qwen), "Soft Adaptive Policy Optimization". τ = ``tau_pos`` where A_t > 0,
    else ``tau_neg`` (larger, so updates that lower a token's probability fade faster off-policy).
    The gate's slope 4σ(1−σ)·ρ is 1 at ρ = 1, so on-policy it is the GRPO gradient; away from
    ρ = 1 the gradient decays smoothly instead of dropping to 0. Use ``seq_mean_token_mean``
    aggregation, as the paper does (TRL, verl).
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ConfigError(f"sapo: temperatures must be > 0, got tau_pos={tau_pos}, tau_neg={tau_neg}")
    ratio, metrics = _ratio(logprobs - old_logprobs, mask)
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    loss = -gate * advantages
    return _finish(loss, metrics, logprobs, old_logprobs, mask, rollout_logprobs,
                   rollout_correction, ref_logprobs, kl_coef, kl_estimator, entropy, entropy_coef)


@POLICY_LOSSES.register("reinforce", "vanilla_pg")
def reinforce(logprobs: Tensor, advantages: Tensor, mask: Tensor,
              old_logprobs: Tensor | None = None, *, rollout_logprobs: Tensor | None = None,
              rollout_correction: RolloutCorrection = TIS, ref_logprobs: Tensor | None = None,
              kl_coef: float = 0.0, kl_estimator: str = "k3", entropy: Tensor | None = None,
              entropy_coef: float = 0.0) -> PolicyLossOutput:
    """Vanilla policy gradient (REINFORCE, Williams 1992): ℓ_t = −A_t · log π(y_t).

    On-policy only: ``old_logprobs`` is accepted (so every policy loss takes the same keywords)
    and ignored, except as π_old of the rollout correction (the current policy if None). Its
    gradient equals PPO's at ρ = 1; its value does not (−A·log π, not −A).
    """
    return _finish(-advantages * logprobs, {}, logprobs, old_logprobs, mask, rollout_logprobs,
                   rollout_correction, ref_logprobs, kl_coef, kl_estimator, entropy, entropy_coef)


# ---------------------------------------------------------------------------- aggregation
#
# Every mode returns (loss_sum, num_items) such that Σ_k loss_sum_k / Σ_k num_items_k over any
# split of a batch into micro-batches equals the full-batch value. That rules out any per-micro-
# batch normaliser (the bug class where "token mean" silently becomes "mean of micro-batch
# token means"); a sequence's own token count or a constant are the only divisors allowed here.
# A row whose mask is empty is not a sequence: it adds 0 to both.

def _token_sum(per_token_loss: Tensor, mask: Tensor) -> Tensor:
    return _masked(per_token_loss, mask).sum(dim=-1)


@LOSS_AGGREGATIONS.register("token_mean", "dapo", "bnpo")
def token_mean(per_token_loss: Tensor, mask: Tensor,
               max_tokens: int | None = None) -> tuple[Tensor, int]:
    """Token-level mean over the whole batch: Σ_i Σ_t ℓ_it / Σ_i |y_i| (DAPO, Yu et al. 2025).

    "bnpo" is an alias: TRL's bnpo divides by the tokens of each *local* micro-batch, which under
    gradient accumulation reweights micro-batches; under alignlab's contract (the loop divides by
    the window's total) batch-normalised and token-level means are the same quantity.
    """
    return _token_sum(per_token_loss, mask).sum(), int(mask.bool().sum())


@LOSS_AGGREGATIONS.register("seq_mean_token_mean", "grpo")
def seq_mean_token_mean(per_token_loss: Tensor, mask: Tensor,
                        max_tokens: int | None = None) -> tuple[Tensor, int]:
    """GRPO's original (Shao et al. 2024): 1/G Σ_i 1/|y_i| Σ_t ℓ_it — sequences weigh equally."""
    lengths = mask.bool().sum(dim=-1)
    per_seq = _token_sum(per_token_loss, mask) / lengths.clamp(min=1).to(per_token_loss.dtype)
    return per_seq.sum(), int((lengths > 0).sum())


@LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm", "dr_grpo")
def seq_mean_token_sum_norm(per_token_loss: Tensor, mask: Tensor,
                            max_tokens: int | None = None) -> tuple[Tensor, int]:
    """Dr. GRPO (Liu et al. 2025): 1/G Σ_i Σ_t ℓ_it / L_max, with L_max a constant.

    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective". ``max_tokens``
    is L_max, the generation budget (``max_new_tokens``, as in the paper and TRL's
    ``max_completion_length``; an eos counts inside it, so not budget + 1). It must be given,
    not taken from the padded width, which differs between micro-batches and would break the
    micro-batch invariance.
    """
    if max_tokens is None or max_tokens <= 0:
        raise ConfigError("loss aggregation 'seq_mean_token_sum_norm' needs max_tokens (the "
                          "constant completion-length budget, e.g. max_new_tokens)")
    lengths = mask.bool().sum(dim=-1)
    return _token_sum(per_token_loss, mask).sum() / max_tokens, int((lengths > 0).sum())


def aggregate(per_token_loss: Tensor, mask: Tensor, mode: str = "token_mean",
              max_tokens: int | None = None) -> tuple[Tensor, int]:
    """(loss_sum, num_items) of a ``[B,T]`` per-token loss under the named aggregation mode."""
    return LOSS_AGGREGATIONS.get(mode)(per_token_loss, mask, max_tokens)


def num_items(mask: Tensor, mode: str = "token_mean") -> int:
    """The ``num_items`` that ``aggregate`` would return, without computing a loss."""
    if LOSS_AGGREGATIONS.get(mode) is token_mean:
        return int(mask.bool().sum())
    return int(mask.bool().any(dim=-1).sum())
