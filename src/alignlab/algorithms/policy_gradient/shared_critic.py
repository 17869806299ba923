"""PPO's value function as a head on the policy's own backbone (``rl.critic: shared``).

V(s_t) = w^T h_{t-1} + b on the policy's last hidden state, the ``AutoModelForCausalLMWithValueHead``
design of TRL's original PPO and of Ziegler et al. 2019's shared-trunk variant: one forward gives
the policy's log-probs and the values, and one backward trains both on
L = L_clip + c_v · L_V (Schulman et al. 2017, eq. 9), with L_V the (clipped) value loss. It
halves PPO's model memory and forwards; the price is that value gradients move the policy's
features (``rl.vf_coef`` weighs them). The separate critic (``critic.py``) stays the
default.

The value loss enters as a token mean in the policy loss's units (scaled by policy items /
tokens): exact for token-level aggregations (``token_mean``, PPO's default), a per-micro-batch
approximation for sequence-level ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alignlab.algorithms.policy_gradient.objective import PolicyObjective
from alignlab.core.errors import ConfigError
from alignlab.engine.loop import LossOutput
from alignlab.losses.policy import aggregate
from alignlab.losses.value import VALUE_LOSSES
from alignlab.models.backbone import find_backbone_and_head
from alignlab.models.logprobs import logprobs_and_values


def value_head_for(policy: nn.Module, device: torch.device) -> nn.Linear:
    """A float32 ``hidden → 1`` head, zero at the start (random values would be noise in the
    first advantages)."""
    parts = find_backbone_and_head(policy)
    if parts is None:
        raise ConfigError("field 'rl.critic': 'shared' needs a policy with a plain output "
                          "embedding (its hidden states feed the value head); use 'separate'")
    head = nn.Linear(parts[1].weight.shape[1], 1).to(device=device, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class SharedCriticObjective(PolicyObjective):
    """``PolicyObjective`` + ``vf_coef`` × the value loss of a head on the same forward."""

    def __init__(self, value_head: nn.Linear, vf_coef: float, value_clip_eps: float | None,
                 *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.value_head, self.vf_coef = value_head, vf_coef
        self.value_loss = "mse" if value_clip_eps is None else "clipped"
        self.value_kwargs = {} if value_clip_eps is None else {"clip_eps": value_clip_eps}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        lp, values, ent = logprobs_and_values(model, self.value_head, batch,
                                              temperature=self.temperature,
                                              with_entropy=self.entropy,
                                              prefix_sharing=self.prefix_sharing)
        mask = batch["loss_mask"]
        policy_sum, items, metrics = self.policy_loss(lp, ent, batch)
        per_token, value_metrics = VALUE_LOSSES.get(self.value_loss)(
            values, batch["old_values"], batch["returns"], mask, **self.value_kwargs)
        value_sum, tokens = aggregate(per_token, mask, "token_mean")
        metrics.update({k: float(v) for k, v in value_metrics.items()})
        metrics["value_loss"] = float(value_sum.detach()) / max(tokens, 1)
        scale = items / max(tokens, 1)  # the value token mean in the policy loss's units
        return LossOutput(policy_sum + self.vf_coef * scale * value_sum, metrics)


__all__ = ["SharedCriticObjective", "value_head_for"]
