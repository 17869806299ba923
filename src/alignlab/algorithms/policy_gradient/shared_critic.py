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
from torch import Tensor, nn

from alignlab.core.errors import ConfigError
from alignlab.losses.policy import aggregate
from alignlab.losses.value import VALUE_LOSSES
from alignlab.models.cpu_attention import cpu_attention
from alignlab.models.logprobs import chunked_logprobs, find_backbone_and_head, scored_hidden_states
from alignlab.models.packed_groups import predictor_hidden
from alignlab.models.shared_tokens import as_groups, sharing_worth_it
from alignlab.engine.loop import LossOutput
from alignlab.algorithms.policy_gradient.objective import PolicyObjective


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


def logprobs_and_values(model: nn.Module, value_head: nn.Linear, batch: dict[str, Any], *,
                        temperature: float = 1.0, with_entropy: bool = False,
                        prefix_sharing: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """From one forward: ``(log π(y_t) [B,T], V(s_t) [B,T], entropy [B,T] or None)`` at the
    scored positions (0 elsewhere), as ``token_logprobs`` and a critic's ``state_values`` give
    them (the value of token t's state is read from the hidden state that predicts it)."""
    decoder, head = find_backbone_and_head(model)
    groups = as_groups(batch) if prefix_sharing else None
    if groups is not None and sharing_worth_it(model, batch, groups):
        with cpu_attention(batch["input_ids"].device):
            rows, lay = predictor_hidden(decoder, groups)
        targets = lay.targets
    else:
        rows, targets = scored_hidden_states(decoder, batch)
    lp, ent = chunked_logprobs(rows, head.weight, head.bias, targets, temperature=temperature,
                               with_entropy=with_entropy)
    values = value_head(rows.float()).squeeze(-1)
    where = batch["loss_mask"][:, 1:].bool()  # row-major scored positions, both paths

    def spread(x: Tensor) -> Tensor:
        out = x.new_zeros(batch["input_ids"].shape)
        out[:, 1:] = out[:, 1:].masked_scatter(where, x)
        return out

    return spread(lp), spread(values), (spread(ent) if with_entropy else None)


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


__all__ = ["SharedCriticObjective", "logprobs_and_values", "value_head_for"]
