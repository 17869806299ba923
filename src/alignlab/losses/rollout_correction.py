"""Rollout/trainer mismatch correction: importance weights from the sampler's to the trainer's
log-probs of the same tokens.

The rollout engine (vLLM, another precision or kernel) samples from π_rollout while the trainer
computes π_old with the same weights; the two differ, which silently makes "on-policy" training
off-policy. A policy loss multiplies its per-token policy-gradient term by a constant weight
w_t built from ρ_t = π_old(y_t)/π_rollout(y_t) = exp(old_logprobs − rollout_logprobs):

- ``tis`` (truncated importance sampling): w_t = clip(ρ_t, low, high), Yao et al. 2025, "Your
  Efficient RL Framework Secretly Brings You Off-Policy RL Training";
- ``mis`` (masked importance sampling): w_t = ρ_t if low ≤ ρ_t ≤ high else 0, Liu, Li et al.
  2025, "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference
  Mismatch".

Both are entries of ``ROLLOUT_CORRECTIONS`` (aliases ``truncated``, ``masked``): a weight
function of the log-ratio and the band, so a variant is one registration away.

The same weights correct stale samples of asynchronous RL (``rl.max_staleness``): the sampler
is then the policy of s updates ago, and π_old the current one, exactly the decoupled
objective of AReaL (Fu et al. 2025) with its behaviour-policy weight truncated.

``level="sequence"`` uses one ratio per completion, exp(Σ_t log ρ_t), for all its tokens (TRL's
``sequence_*`` modes). This is the decoupled-PPO weight (Hilton et al. 2021): the PPO ratio
stays π/π_old, the weight corrects π_old against the sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from alignlab.core.errors import ConfigError
from alignlab.core.registry import Registry
from alignlab.losses.advantages import masked_mean
from alignlab.losses.kl import LOG_RATIO_CLAMP

ROLLOUT_CORRECTIONS: Registry = Registry("rollout correction mode")


@ROLLOUT_CORRECTIONS.register("tis", "truncated")
def truncated_weights(log_ratio: Tensor, log_low: float, log_high: float) -> Tensor:
    """TIS (Yao et al. 2025): w = clip(ρ, low, high), from log ρ (clamped before exp)."""
    return log_ratio.clamp(log_low, log_high).clamp(max=LOG_RATIO_CLAMP).exp()


@ROLLOUT_CORRECTIONS.register("mis", "masked")
def masked_weights(log_ratio: Tensor, log_low: float, log_high: float) -> Tensor:
    """MIS (Liu, Li et al. 2025): w = ρ inside [low, high] (inclusive), else 0."""
    outside = (log_ratio < log_low) | (log_ratio > log_high)
    return torch.where(outside, torch.zeros_like(log_ratio),
                       log_ratio.clamp(max=LOG_RATIO_CLAMP).exp())


@dataclass(frozen=True)
class RolloutCorrection:
    """How a policy loss turns ``rollout_logprobs`` into weights (see the module docstring).

    ``low``/``high`` bound ρ (None: unbounded on that side); the defaults are TIS's cap C = 2."""

    mode: Literal["tis", "mis", "truncated", "masked"] = "tis"
    level: Literal["token", "sequence"] = "token"
    low: float | None = None
    high: float | None = 2.0


def rollout_correction(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                       correction: RolloutCorrection = RolloutCorrection()
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """``(weights [B,T], metrics)``: TIS/MIS weights from ρ = exp(old_logprobs − rollout_logprobs).

    The weights are detached (ρ involves no θ: both log-probs are frozen for the update) and 0
    outside ``mask``. Metrics: mean and max |Δlogp| over completion tokens, the mean and max ρ,
    the mean weight, and the fraction of tokens whose ρ was truncated (``tis``) or masked
    (``mis``)."""
    weight_fn = ROLLOUT_CORRECTIONS.get(correction.mode)
    if correction.level not in ("token", "sequence"):
        raise ConfigError(f"rollout correction level must be 'token' or 'sequence', got "
                          f"{correction.level!r}")
    if (correction.low is not None and correction.high is not None
            and not 0 <= correction.low <= correction.high):
        raise ConfigError(f"rollout correction needs 0 <= low <= high, got low={correction.low}, "
                          f"high={correction.high}")
    keep = mask.bool()
    with torch.no_grad():
        diff = torch.where(keep, old_logprobs.detach() - rollout_logprobs.detach(),
                           torch.zeros_like(old_logprobs))
        log_ratio = diff.sum(-1, keepdim=True).expand_as(diff) if correction.level == "sequence" else diff
        # in log space: a sequence ratio is a product of T token ratios and overflows easily
        log_low = -math.inf if not correction.low else math.log(correction.low)
        log_high = math.inf if correction.high is None else math.log(correction.high)
        outside = (log_ratio < log_low) | (log_ratio > log_high)
        weights = weight_fn(log_ratio, log_low, log_high)
        weights = torch.where(keep, weights, torch.zeros_like(weights))
        abs_diff = diff.abs()
        ratio = log_ratio.clamp(max=LOG_RATIO_CLAMP).exp()
        name = "masked_fraction" if weight_fn is masked_weights else "truncated_fraction"
        none = abs_diff.new_zeros(())
        metrics = {
            "rollout_is/abs_logp_diff_mean": masked_mean(abs_diff, mask),
            "rollout_is/abs_logp_diff_max": abs_diff.max() if keep.any() else none,
            "rollout_is/ratio_mean": masked_mean(ratio, mask),
            "rollout_is/ratio_max": ratio[keep].max() if keep.any() else none,
            "rollout_is/weight_mean": masked_mean(weights, mask),
            f"rollout_is/{name}": masked_mean((outside & keep).float(), mask),
        }
    return weights, metrics
