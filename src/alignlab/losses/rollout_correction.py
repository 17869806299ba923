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
from alignlab.losses.advantages import masked_mean
from alignlab.losses.kl import LOG_RATIO_CLAMP


@dataclass(frozen=True)
class RolloutCorrection:
    """How a policy loss turns ``rollout_logprobs`` into weights (see the module docstring).

    ``low``/``high`` bound ρ (None: unbounded on that side); the defaults are TIS's cap C = 2."""

    mode: Literal["tis", "mis"] = "tis"
    level: Literal["token", "sequence"] = "token"
    low: float | None = None
    high: float | None = 2.0


def rollout_correction(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                       correction: RolloutCorrection = RolloutCorrection()
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """``(weights [B,T], metrics)``: TIS/MIS weights from ρ = exp(old_logprobs − rollout_logprobs).

    The weights are detached (ρ involves no θ: both log-probs are frozen for the update) and 0
    outside ``mask``. Metrics: mean and max |Δlogp| over completion tokens, the mean ρ and
    weight, and the fraction of tokens whose ρ was truncated (``tis``) or masked (``mis``)."""
    if correction.mode not in ("tis", "mis"):
        raise ConfigError(f"rollout correction mode must be 'tis' or 'mis', got {correction.mode!r}")
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
        if correction.mode == "tis":
            weights = log_ratio.clamp(log_low, log_high).clamp(max=LOG_RATIO_CLAMP).exp()
        else:
            weights = torch.where(outside, torch.zeros_like(log_ratio),
                                  log_ratio.clamp(max=LOG_RATIO_CLAMP).exp())
        weights = torch.where(keep, weights, torch.zeros_like(weights))
        abs_diff = diff.abs()
        name = "truncated_fraction" if correction.mode == "tis" else "masked_fraction"
        metrics = {
            "rollout_is/abs_logp_diff_mean": masked_mean(abs_diff, mask),
            "rollout_is/abs_logp_diff_max": abs_diff.max() if keep.any() else abs_diff.new_zeros(()),
            "rollout_is/ratio_mean": masked_mean(log_ratio.clamp(max=LOG_RATIO_CLAMP).exp(), mask),
            "rollout_is/weight_mean": masked_mean(weights, mask),
            f"rollout_is/{name}": masked_mean((outside & keep).float(), mask),
        }
    return weights, metrics
