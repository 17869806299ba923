"""PPO's separate critic: a value model V(s_t) and its (clipped) value loss.

The critic is a copy of the policy's backbone with a scalar head (``CausalLMWithScalarHead``),
as in RL4LMs (Ramamurthy et al. 2023) and TRL; InstructGPT (Ouyang et al. 2022) starts it from
the reward model instead. It is trained by its own ``engine.learner.Learner`` (``rl.epochs``
passes over shuffled minibatches, micro-batches under the loop's ``num_items`` contract) on ℓ_t = ½ max((V_t − R_t)², (V_clip,t − R_t)²) (Schulman et al. 2017).

Alignment: the value of the state in which completion token ``y_t`` is chosen is read from the
hidden state at ``t − 1`` — the position whose logits gave ``log π(y_t)`` — so ``values[b, t]``
lines up with ``old_logprobs[b, t]`` and ``loss_mask[b, t]``
(:func:`alignlab.models.logprobs.state_values`).
"""

from __future__ import annotations

from typing import Any

import torch

from alignlab.engine.loop import LossOutput
from alignlab.losses.policy import aggregate, num_items
from alignlab.losses.value import VALUE_LOSSES
from alignlab.models.adapters import copy_sharing_frozen, has_adapters
from alignlab.models.heads import CausalLMWithScalarHead
from alignlab.models.logprobs import state_values


class ValueObjective:
    """The loop's ``Algorithm`` for the critic: a registered value loss, token mean, × ``coef``.

    ``clip_eps=None`` uses the unclipped ``mse`` loss. The batch carries ``old_values`` (the
    critic's values at rollout time) and ``returns`` (GAE's A + V).
    """

    def __init__(self, clip_eps: float | None = 0.2, coef: float = 1.0) -> None:
        self.loss_name = "mse" if clip_eps is None else "clipped"
        self.kwargs = {} if clip_eps is None else {"clip_eps": clip_eps}
        self.coef = coef

    def num_items(self, batch: dict[str, Any]) -> float:
        return float(num_items(batch["loss_mask"], "token_mean"))

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        mask = batch["loss_mask"]
        values = state_values(model, batch)
        per_token, metrics = VALUE_LOSSES.get(self.loss_name)(
            values, batch["old_values"], batch["returns"], mask, **self.kwargs)
        loss_sum, n = aggregate(per_token, mask, "token_mean")
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["value_loss"] = float(loss_sum.detach()) / max(n, 1)
        return LossOutput(self.coef * loss_sum, metrics)


def new_critic(policy: torch.nn.Module) -> CausalLMWithScalarHead:
    """A fresh critic on a copy of the policy's backbone (the output embedding is dropped).

    The head starts at 0: random initial values would be noise in the first advantages. Under
    LoRA the critic shares the policy's frozen base weights and trains its own copy of the
    adapters with the head (the head is outside peft, so it trains whole, as
    ``modules_to_save`` would); otherwise it trains a full copy.
    """
    lora = has_adapters(policy)
    critic = CausalLMWithScalarHead(copy_sharing_frozen(policy))
    torch.nn.init.zeros_(critic.head.weight)
    torch.nn.init.zeros_(critic.head.bias)
    return critic.requires_grad_(True) if not lora else critic
