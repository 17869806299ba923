"""Per-token estimators of KL(π ‖ π_ref) from tokens sampled from π.

Schulman, "Approximating KL Divergence" (2020, blog note). With r = π_ref(y)/π(y) and
log r = ref_logprobs − logprobs, for y ~ π:

- ``k1`` = −log r              unbiased, high variance, can be negative per token;
- ``k2`` = ½ (log r)²          biased, low variance, ≈ KL when π and π_ref are close;
- ``k3`` = (r − 1) − log r     unbiased, low variance, ≥ 0 per token.

Every estimator is 0 where ``logprobs == ref_logprobs``, so the padding positions of token
log-probs (which are 0 where ``loss_mask`` is 0, see ARCHITECTURE.md) give 0 without a mask.
``k1`` is what InstructGPT-style PPO puts in the reward; GRPO (Shao et al. 2024) uses ``k3``
as a loss term. Aliases follow verl's names (``kl``, ``mse``, ``low_var_kl``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignlab.core.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator")

# exp(20) ≈ 4.9e8 is still finite in bf16/fp32; beyond it a single token whose log-prob has
# collapsed under π_ref would make k3 (and its gradient) overflow and stop training. Clamping the
# log-ratio changes the estimate only for tokens that are already astronomically unlikely.
LOG_RATIO_CLAMP = 20.0


@KL_ESTIMATORS.register("k1", "kl")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log π(y) − log π_ref(y); unbiased for KL(π‖π_ref), y ~ π (Schulman 2020)."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2", "mse")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = ½ (log π(y) − log π_ref(y))²; biased, low variance, ≈ KL when π ≈ π_ref."""
    return 0.5 * (logprobs - ref_logprobs).square()


@KL_ESTIMATORS.register("k3", "low_var_kl")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = r − log r − 1 with r = π_ref(y)/π(y); unbiased and ≥ 0 (Schulman 2020).

    The log-ratio is clamped to ±``LOG_RATIO_CLAMP`` before the exponential (numerical safety).
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio) - log_ratio - 1.0


def token_kl(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1",
             mask: Tensor | None = None) -> Tensor:
    """Per-token KL estimate with the named estimator; 0 where ``mask`` is 0 (if given)."""
    kl = KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs)
    return kl if mask is None else kl * mask.to(kl.dtype)
