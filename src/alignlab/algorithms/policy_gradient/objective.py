"""The policy's objective in online RL: a registered policy loss, reduced by a registered
aggregation, on log-probs of the policy as the algorithm defines it."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from alignlab.core.errors import ConfigError
from alignlab.engine.loop import LossOutput
from alignlab.losses.policy import POLICY_LOSSES, aggregate, num_items
from alignlab.losses.rollout_correction import RolloutCorrection
from alignlab.models.logprobs import token_logprobs


class PolicyObjective:
    """The loop's ``Algorithm``: a registered policy loss reduced by a registered aggregation.

    ``num_items`` comes from the aggregation, so the loop's window normalisation makes the
    update independent of how a minibatch is split into micro-batches.
    """

    def __init__(self, policy_loss: str = "ppo_clip", aggregation: str = "token_mean", *,
                 clip_eps_low: float = 0.2, clip_eps_high: float | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", max_tokens: int | None = None,
                 temperature: float = 1.0, entropy: bool = False, prefix_sharing: bool = True,
                 loss_kwargs: dict[str, Any] | None = None,
                 rollout_correction: RolloutCorrection | None = None) -> None:
        self.loss_fn = POLICY_LOSSES.get(policy_loss)
        self.aggregation, self.max_tokens = aggregation, max_tokens
        accepted = inspect.signature(self.loss_fn).parameters
        # PPO's clip range goes only to losses that clip the same ratio (not SAPO's soft gate,
        # nor CISPO, whose own defaults bound the IS weight, not the ratio).
        clip = ({"clip_eps_low": clip_eps_low, "clip_eps_high": clip_eps_high}
                if policy_loss in ("ppo_clip", "ppo", "gspo") else {})
        self.clip = {**clip, **(loss_kwargs or {})}
        unknown = sorted(set(self.clip) - set(accepted))
        if unknown:
            raise ConfigError(f"field 'rl.policy_loss_kwargs': {unknown} are not hyper-parameters "
                              f"of {policy_loss!r}; accepted: {sorted(accepted)}")
        self.rollout_correction = rollout_correction
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.temperature, self.entropy = temperature, entropy
        self.prefix_sharing = prefix_sharing

    def num_items(self, batch: dict[str, Any]) -> float:
        return float(num_items(batch["loss_mask"], self.aggregation))

    def policy_logprobs(self, model: torch.nn.Module, batch: dict[str, Any],
                        return_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """log π(y_t) as this objective defines the policy (NLPO's restricts it to an action mask)."""
        return token_logprobs(model, batch, temperature=self.temperature,
                              return_entropy=return_entropy, prefix_sharing=self.prefix_sharing)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        out = self.policy_logprobs(model, batch, return_entropy=self.entropy)
        lp, ent = out if self.entropy else (out, None)
        loss_sum, _, metrics = self.policy_loss(lp, ent, batch)
        return LossOutput(loss_sum, metrics)

    def policy_loss(self, lp: torch.Tensor, ent: torch.Tensor | None, batch: dict[str, Any]
                    ) -> tuple[torch.Tensor, int, dict[str, float]]:
        """``(loss sum, num items, metrics)`` of the registered policy loss on log-probs ``lp``."""
        mask = batch["loss_mask"]
        # Absent when the rollout batch gets exactly one optimizer step: the sampling policy is
        # then the current one, so the ratio is exactly 1 and an extra forward pass is saved.
        old = batch["old_logprobs"] if "old_logprobs" in batch else lp.detach()
        extra: dict[str, Any] = {}
        if self.rollout_correction is not None:
            extra = {"rollout_logprobs": batch["rollout_logprobs"],
                     "rollout_correction": self.rollout_correction}
        res = self.loss_fn(lp, old, batch["advantages"], mask, **self.clip, **extra,
                           ref_logprobs=batch.get("ref_logprobs"), kl_coef=self.kl_coef,
                           kl_estimator=self.kl_estimator, entropy=ent)
        loss_sum, items = aggregate(res.per_token_loss, mask, self.aggregation, self.max_tokens)
        return loss_sum, items, {k: float(v) for k, v in res.metrics.items()}
