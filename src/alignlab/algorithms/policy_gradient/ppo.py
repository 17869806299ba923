"""PPO with a critic and GAE, RLHF style (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022;
RL4LMs, Ramamurthy et al. 2023): the hooks it adds to the policy-gradient algorithm.

Per iteration, after the rollout and the old/reference log-probs (``algorithm.py``):

1. V_t = critic(s_t) on every completion token (``critic.py``, or a value head on the policy,
   ``shared_critic.py``);
2. r_t = 1[t = last]·score − β·KL_t, β from a fixed or adaptive KL controller (Ziegler et al.
   2019: β ← β(1 + clip(KL/target − 1, ±0.2)·n/horizon)); optionally whitened (scaled only);
3. A = GAE(γ, λ) (Schulman et al. 2016), R = A + V; A optionally whitened over the batch;
4. the policy: PPO's clipped surrogate (Schulman et al. 2017), ``rl.epochs`` × minibatches;
   the critic (``after_update``): clipped value loss on R, the same epochs × minibatches, its
   own optimizer (with ``rl.critic: shared`` it trains inside the policy's loss instead).

The critic, its optimizer and the controller's β are in ``state_dict`` (every checkpoint).
"""

from __future__ import annotations

from typing import Any

import torch

from alignlab.algorithms.policy_gradient.algorithm import Experience, PolicyGradient
from alignlab.algorithms.policy_gradient.config import PPORLSection
from alignlab.algorithms.policy_gradient.critic import ValueObjective, new_critic
from alignlab.engine import distributed, sharding
from alignlab.engine.learner import Learner, Units
from alignlab.losses.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    masked_var,
    scores_to_token_rewards,
    whiten,
)
from alignlab.losses.kl import token_kl
from alignlab.models.adapters import adapter_state_dict, load_adapter_state_dict
from alignlab.models.logprobs import logprobs_and_values, state_values


@torch.no_grad()
def ppo_advantages(scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
                   kl: torch.Tensor | None, kl_coef: float, gamma: float, lam: float,
                   whiten_rewards: bool = False, whiten_advantages: bool = True,
                   token_rewards: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)`` [B,T] from r_t = 1[t=last]·score − β·KL_t and GAE(γ, λ).

    With ``token_rewards`` (dense components included in ``score``) the rewards are
    r_t = token_rewards_t + 1[t=last]·(score − Σ token_rewards) − β·KL_t."""
    rewards = scores_to_token_rewards(scores, mask, token_rewards)
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(mask=mask, values=values, rewards=rewards, gamma=gamma, lam=lam)
    if whiten_advantages:
        advantages = whiten(advantages, mask)
    return advantages, returns


class PPO(PolicyGradient):
    """``PolicyGradient`` whose advantages come from a learned critic (GAE) and a KL controller.

    ``value_head`` set: the shared critic (a head on the policy, trained in the policy's loss);
    else a separate critic model with its own learner, built by :meth:`separate_critic`."""

    rl: PPORLSection

    def __init__(self, *args: Any, critic: Learner | None = None,
                 value_head: torch.nn.Linear | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        rl = self.rl
        self.critic, self.value_head = critic, value_head
        self.kl_in_reward = (rl.kl_in or "reward") == "reward"
        self.kl_ctl = (AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)
                       if rl.kl_controller == "adaptive" else FixedKLController(rl.kl_coef))

    @staticmethod
    def separate_critic(policy: torch.nn.Module, cfg: Any) -> Learner:
        """A critic on a copy of the initial policy's backbone, with its own optimizer."""
        rl = cfg.rl
        train = cfg.train.model_copy(update={"lr": rl.critic_lr or cfg.train.lr})
        return Learner(new_critic(policy), ValueObjective(rl.value_clip_eps, rl.vf_coef), train,
                       epochs=rl.epochs, minibatch_size=rl.minibatch_size,
                       seed=cfg.train.seed + 1)

    def values(self, exp: Experience) -> torch.Tensor:
        """V(s_t) ``[B,T]`` of the rollout rows before the update (no gradient)."""
        if self.critic is not None:
            return self.logprobs(self.critic.model, exp, state_values)
        head, sharing = self.value_head, self.rl.prefix_sharing

        def fn(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            return logprobs_and_values(model, head, batch, prefix_sharing=sharing)[1]

        return self.logprobs(self.learner.model, exp, fn)

    def advantages(self, exp: Experience) -> dict[str, float]:
        """Put ``old_values``, ``returns`` and ``advantages`` into ``exp``; step the KL controller.

        Per-token reward components (``token_rewards``, already summed into ``scores``) are
        credited where they occur; the rest of each score on its last token. With N processes
        the whitening, the metrics and the KL controller see every rank's rows as one batch."""
        rl, mask = self.rl, exp["loss_mask"]
        # a rank without rows (every group dropped) still takes part in the gather below
        values = self.values(exp) if len(mask) else torch.zeros(mask.shape)
        rows = {"scores": exp["scores"], "values": values, "loss_mask": mask}
        if "token_rewards" in exp:
            rows["token_rewards"] = exp["token_rewards"]
        if "ref_logprobs" in exp:
            rows["kl"] = token_kl(exp["old_logprobs"], exp["ref_logprobs"], self.kl_estimator,
                                  mask)
        beta = self.kl_ctl.kl_coef if self.kl_in_reward else 0.0

        def fn(rows: Experience) -> tuple[Experience, dict[str, float]]:
            mask, values, kl = rows["loss_mask"], rows["values"], rows.get("kl")
            advantages, returns = ppo_advantages(
                rows["scores"], values, mask, kl=kl, kl_coef=beta, gamma=rl.gamma,
                lam=rl.gae_lambda, token_rewards=rows.get("token_rewards"),
                whiten_rewards=rl.whiten_rewards, whiten_advantages=rl.whiten_advantages)
            m = {"kl_coef": beta, "value_rollout_mean": float(values[mask.bool()].mean()),
                 # 1 − Var(R − V)/Var(R) of the critic that produced the advantages (CleanRL).
                 "explained_variance": float(1 - masked_var(returns - values, mask)
                                             / masked_var(returns, mask).clamp(min=1e-8))}
            if kl is not None:
                seq_kl = float(kl.sum(-1).mean())
                m["kl_penalty"] = beta * seq_kl
                if self.kl_in_reward:
                    self.kl_ctl.update(seq_kl, n_steps=int(mask.shape[0]))
            return {"advantages": advantages, "returns": returns}, m

        out, m = distributed.whole_batch(fn, rows)
        exp["advantages"] = out.get("advantages", torch.zeros(mask.shape))
        exp["returns"] = out.get("returns", torch.zeros(mask.shape))
        exp["old_values"] = values
        return m or {}

    def after_update(self, units: Units, metrics: dict[str, float]) -> None:
        """The separate critic learns on the same rows (a shared one learned with the policy)."""
        if self.critic is None:
            return
        out = self.critic.update(units)
        # The policy's metrics share the log line: name the critic's generic ones apart.
        renamed = {"loss": "critic_loss", "grad_norm": "critic_grad_norm", "lr": "critic_lr",
                   "optimizer_steps": "critic_optimizer_steps"}
        metrics.update({renamed.get(k, k): v for k, v in out.items()})

    def scoring_models(self) -> list[torch.nn.Module]:
        return [self.critic.model] if self.critic is not None else []

    def state_dict(self) -> dict[str, Any]:
        critic = ({**self.critic.state_dict(), "weights": self._critic_weights()}
                  if self.critic is not None else {"value_head": self.value_head.state_dict()})
        return {**super().state_dict(), "critic": critic,
                "kl_controller": self.kl_ctl.state_dict()}

    def _critic_weights(self) -> dict[str, torch.Tensor]:
        """The separate critic's weights for a checkpoint; sharded by FSDP2, its full state dict
        (gathered on every rank; rank 0's is the one written)."""
        weights = sharding.full_state_dict(self.critic.model)
        return adapter_state_dict(self.critic.model) if weights is None else weights

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.critic is not None:
            if sharding.is_sharded(self.critic.model):  # FSDP2: each rank takes its shards
                sharding.load_full_state_dict(self.critic.model, state["critic"]["weights"])
            else:
                load_adapter_state_dict(self.critic.model, state["critic"]["weights"])
            self.critic.load_state_dict(state["critic"])
        else:
            self.value_head.load_state_dict(state["critic"]["value_head"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
