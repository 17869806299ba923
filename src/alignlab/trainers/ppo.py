"""PPO with a critic and GAE, RLHF style (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022;
RL4LMs, Ramamurthy et al. 2023), and NLPO on top of it — what they add to the online loop.

Per iteration, after the rollout and the old/reference log-probs (``trainers/online.py``):

1. V_t = critic(s_t) on every completion token (``value_role.py``);
2. r_t = 1[t = last]·score − β·KL_t, β from a fixed or adaptive KL controller (Ziegler et al.
   2019: β ← β(1 + clip(KL/target − 1, ±0.2)·n/horizon)); optionally whitened (scaled only);
3. A = GAE(γ, λ) (Schulman et al. 2016), R = A + V; A optionally whitened over the batch;
4. the policy: PPO's clipped surrogate (Schulman et al. 2017), ``rl.epochs`` × minibatches;
   the critic: clipped value loss on R, the same epochs × minibatches, its own optimizer
   (or, with ``rl.critic: shared``, a value head on the policy trained in the same loss).

The critic, the controller's β and NLPO's masking policy are saved in every checkpoint.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from alignlab.errors import ConfigError
from alignlab.losses.advantages import (AdaptiveKLController, FixedKLController, gae,
                                        masked_var, scores_to_token_rewards, whiten)
from alignlab.losses.kl import token_kl
from alignlab.trainers.nlpo import ActionMask
from alignlab.trainers.online import OnlineRLConfig, RLSection
from alignlab.trainers.shared_critic import shared_values, value_head_for
from alignlab.trainers.value_role import ValueObjective, ValueRole
from alignlab.utils.runtime import pick_device


class PPORLSection(RLSection):
    """``RLSection`` plus the critic, GAE and the KL controller."""

    gamma: float = Field(1.0, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    """Divide the token rewards by their batch std before GAE (the mean is kept)."""
    value_clip_eps: float | None = Field(0.2, gt=0)
    """ε_v of the clipped value loss; null: unclipped MSE."""
    vf_coef: float = Field(0.5, gt=0)
    """Weight of the value loss (with the separate critic and Adam it acts through clipping)."""
    critic_lr: float | None = Field(None, gt=0)
    """Defaults to ``train.lr``: the separate critic's optimizer, or the shared value head's
    parameter group (a head alone learns slowly at the policy's lr: raise it, e.g. 20×)."""
    critic: Literal["separate", "shared"] = "separate"
    """``separate``: a copy of the policy's backbone with a scalar head and its own optimizer;
    ``shared``: a value head on the policy's own hidden states, trained with the policy on
    L_clip + vf_coef·L_V (``shared_critic.py``)."""
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    """``adaptive``: β starts at ``kl_coef`` and tracks ``kl_target`` (KL in the reward only)."""
    kl_target: float = Field(6.0, gt=0)
    """Target mean sequence KL (nats) of the adaptive controller."""
    kl_horizon: float = Field(10_000, gt=0)
    """Samples over which the adaptive controller closes the gap."""

    @model_validator(mode="after")
    def _check_controller(self) -> "PPORLSection":
        if self.kl_controller == "adaptive" and self.kl_in == "loss":
            raise ValueError("rl.kl_controller: 'adaptive' adjusts the KL penalty in the reward; "
                             "set rl.kl_in: reward (or rl.kl_controller: fixed)")
        return self


class NLPORLSection(PPORLSection):
    """``PPORLSection`` plus NLPO's masking policy."""

    nlpo_top_p: float = Field(0.9, gt=0, le=1)
    """p of the top-p action mask M_t (1 keeps every token: NLPO becomes PPO)."""
    nlpo_update_every: int = Field(5, gt=0)
    """Iterations between refreshes of the masking policy with the policy's weights (μ)."""


RL_SECTIONS: dict[str, type[RLSection]] = {"ppo": PPORLSection, "nlpo": NLPORLSection}


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


class PPOParts:
    """The critic, the KL controller and (NLPO) the action mask, driven by ``run_online``."""

    def __init__(self, cfg: OnlineRLConfig, policy: torch.nn.Module, kl_estimator: str,
                 action_mask: bool) -> None:
        rl = cfg.rl if isinstance(cfg.rl, PPORLSection) else PPORLSection(**cfg.rl.model_dump())
        if action_mask and not isinstance(rl, NLPORLSection):
            rl = NLPORLSection(**rl.model_dump())
        self.rl, self.kl_estimator = rl, kl_estimator
        self.kl_in_reward = (rl.kl_in or "reward") == "reward"
        self.kl_ctl = (AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)
                       if rl.kl_controller == "adaptive" else FixedKLController(rl.kl_coef))
        self.policy, self.critic, self.value_head = policy, None, None
        self.device = pick_device(cfg.train.device)
        self.micro_batch_size = cfg.train.batch_size
        if rl.critic == "shared":
            if action_mask:
                raise ConfigError("field 'rl.critic': nlpo takes a separate critic (its policy "
                                  "log-probs are restricted to the action mask); use 'separate'")
            self.value_head = value_head_for(policy, self.device)
        else:
            train = cfg.train.model_copy(update={"lr": rl.critic_lr or cfg.train.lr})
            self.critic = ValueRole.from_policy(
                policy, ValueObjective(rl.value_clip_eps, rl.vf_coef), train, epochs=rl.epochs,
                minibatch_size=rl.minibatch_size, seed=cfg.train.seed + 1)
        self.action_mask = (ActionMask(policy, rl.nlpo_top_p, rl.nlpo_update_every,
                                       pick_device(cfg.train.device))
                            if action_mask else None)

    def begin_iteration(self, policy: torch.nn.Module, iteration: int) -> None:
        if self.action_mask is not None:
            self.action_mask.maybe_refresh(policy, iteration)

    def add_advantages(self, exp: dict[str, torch.Tensor], scores: torch.Tensor,
                       token_rewards: torch.Tensor | None = None) -> dict[str, float]:
        """Put ``old_values``, ``returns`` and ``advantages`` into ``exp``; step the KL controller.

        ``token_rewards [B,T]`` (per-token reward components, already summed into ``scores``)
        are credited where they occur; the rest of each score on its last token."""
        rl, mask = self.rl, exp["loss_mask"]
        values = (self.critic.values(exp) if self.critic is not None else
                  shared_values(self.policy, self.value_head, exp, device=self.device,
                                micro_batch_size=self.micro_batch_size,
                                prefix_sharing=rl.prefix_sharing))
        kl = None
        if "ref_logprobs" in exp:
            kl = token_kl(exp["old_logprobs"], exp["ref_logprobs"], self.kl_estimator, mask)
        beta = self.kl_ctl.kl_coef if self.kl_in_reward else 0.0
        exp["advantages"], exp["returns"] = ppo_advantages(
            scores, values, mask, kl=kl, kl_coef=beta, gamma=rl.gamma, lam=rl.gae_lambda,
            token_rewards=token_rewards,
            whiten_rewards=rl.whiten_rewards, whiten_advantages=rl.whiten_advantages)
        exp["old_values"] = values
        m = {"kl_coef": beta, "value_rollout_mean": float(values[mask.bool()].mean()),
             # 1 − Var(R − V)/Var(R) of the critic that produced the advantages (CleanRL).
             "explained_variance": float(1 - masked_var(exp["returns"] - values, mask)
                                         / masked_var(exp["returns"], mask).clamp(min=1e-8))}
        if kl is not None:
            seq_kl = float(kl.sum(-1).mean())
            m["kl_penalty"] = beta * seq_kl
            if self.kl_in_reward:
                self.kl_ctl.update(seq_kl, n_steps=int(mask.shape[0]))
        if self.action_mask is not None:
            m["nlpo_mask_refreshes"] = self.action_mask.refreshes
        return m

    def update_critic(self, exp: dict[str, torch.Tensor]) -> dict[str, float]:
        """The separate critic's update (a shared one trains inside the policy's)."""
        return self.critic.update(exp) if self.critic is not None else {}

    def state_dict(self) -> dict[str, Any]:
        critic = (self.critic.state_dict() if self.critic is not None
                  else {"value_head": self.value_head.state_dict()})
        state = {"critic": critic, "kl_controller": self.kl_ctl.state_dict()}
        if self.action_mask is not None:
            state["action_mask"] = self.action_mask.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
        else:
            self.value_head.load_state_dict(state["critic"]["value_head"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if self.action_mask is not None:
            self.action_mask.load_state_dict(state["action_mask"])
