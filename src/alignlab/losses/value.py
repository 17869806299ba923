"""Value-function (critic) losses for PPO, per token, to be reduced with ``policy.aggregate``.

Each entry of ``VALUE_LOSSES`` takes ``values``, ``old_values``, ``returns``, ``mask`` (``[B,T]``)
and returns ``(per_token_loss [B,T], metrics)``, the loss 0 outside ``mask``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignlab.core.registry import Registry
from alignlab.losses.advantages import masked_mean, masked_var

VALUE_LOSSES: Registry = Registry("value loss")


def _metrics(values: Tensor, returns: Tensor, mask: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        # 1 − Var(R − V)/Var(R): 1 is a perfect critic, ≤ 0 no better than a constant.
        explained = 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(
            min=1e-8)
        return {"value_mean": masked_mean(values, mask),
                "value_explained_variance": explained}


@VALUE_LOSSES.register("clipped", "ppo")
def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_eps: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped value loss: ℓ_t = ½ max((V_t − R_t)², (V_clip,t − R_t)²).

    V_clip,t = V_old,t + clip(V_t − V_old,t, −ε, ε) (Schulman et al. 2017, as in OpenAI
    baselines and InstructGPT's PPO).
    """
    unclipped = (values - returns).square()
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    clipped = (values_clipped - returns).square()
    loss = 0.5 * torch.maximum(unclipped, clipped)
    metrics = _metrics(values, returns, mask)
    with torch.no_grad():
        metrics["value_clip_fraction"] = masked_mean((clipped > unclipped).float(), mask)
    return torch.where(mask.bool(), loss, torch.zeros_like(loss)), metrics


@VALUE_LOSSES.register("mse")
def mse_value_loss(values: Tensor, old_values: Tensor | None, returns: Tensor, mask: Tensor
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Unclipped value regression: ℓ_t = ½ (V_t − R_t)² (``old_values`` is ignored)."""
    loss = 0.5 * (values - returns).square()
    return torch.where(mask.bool(), loss, torch.zeros_like(loss)), _metrics(values, returns, mask)
