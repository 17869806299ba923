"""``alignlab train grpo|rloo|remax|reinforce_pp|ppo|nlpo``: build the parts, run the controller.

The parts are built in an order that keeps resume exact: seed first; the reference, PPO's
critic and NLPO's masking policy are copies of the *initial* policy, made before a checkpoint
is loaded into it. Under LoRA none of them copies the frozen base weights: the reference is the
policy with its adapters disabled, the critic and the masking policy copy only the adapters
(``models/adapters.py``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from alignlab.algorithms.common import (
    load_policy,
    load_prompt_source,
    render_chat_prompts,
    save_final,
)
from alignlab.algorithms.policy_gradient.algorithm import PolicyGradient
from alignlab.algorithms.policy_gradient.config import (
    RL_SECTIONS,
    OnlineRLConfig,
    RLSection,
    config_for,
)
from alignlab.algorithms.policy_gradient.nlpo import NLPO, ActionMask, MaskedPolicyObjective
from alignlab.algorithms.policy_gradient.objective import PolicyObjective
from alignlab.algorithms.policy_gradient.ppo import PPO
from alignlab.algorithms.policy_gradient.shared_critic import SharedCriticObjective, value_head_for
from alignlab.algorithms.policy_gradient.spec import RL_ALGORITHMS, RLAlgorithm
from alignlab.algorithms.registry import ALGORITHMS, AlgorithmEntry
from alignlab.core.errors import ConfigError
from alignlab.core.runtime import pick_device, seed_everything
from alignlab.engine.controller import OnlineRun, OnlineSetup, run_online
from alignlab.engine.learner import Learner
from alignlab.engine.placement import open_placement, refuse_ray
from alignlab.engine.run import prepare_run
from alignlab.losses.rollout_correction import RolloutCorrection
from alignlab.models.adapters import reference_model
from alignlab.rewards.sandbox import Limits
from alignlab.rewards.scoring import RewardRole, build_reward_role
from alignlab.rollout.role import RolloutRole, make_backend

ALGORITHM_CLASSES: dict[str, type[PolicyGradient]] = {"ppo": PPO, "nlpo": NLPO}
"""Algorithms with their own hooks; every other name is a ``PolicyGradient`` of its spec."""


def build_reward(cfg: RLSection, task: Any) -> RewardRole:
    limits = {name: Limits(timeout_s=box.timeout_s or cfg.reward_timeout_s or 60.0,
                           memory_mb=box.memory_mb, max_output_bytes=64 << 20)
              for name, box in cfg.reward_sandbox.items()}
    return build_reward_role(cfg.reward, task, params=cfg.reward_params, sandbox=limits,
                             on_error=cfg.on_reward_error, timeout_s=cfg.reward_timeout_s)


def make_objective(spec: RLAlgorithm, cfg: OnlineRLConfig, max_tokens: int, *,
                   action_mask: ActionMask | None = None,
                   value_head: torch.nn.Module | None = None) -> PolicyObjective:
    """The policy's objective; with NLPO's ``action_mask`` its log-probs are those of π^M; with
    a shared critic's ``value_head`` it adds the value loss (``shared_critic.py``)."""
    rl = cfg.rl
    kl_in = rl.kl_in or spec.kl_in
    if value_head is not None:
        cls = functools.partial(SharedCriticObjective, value_head, rl.vf_coef, rl.value_clip_eps)
    elif action_mask is not None:
        cls = functools.partial(MaskedPolicyObjective, action_mask)
    else:
        cls = PolicyObjective
    correction = (RolloutCorrection(**rl.rollout_correction.model_dump())
                  if rl.rollout_correction is not None else None)
    return cls(
        rl.policy_loss or ("gspo" if rl.importance == "sequence" else "ppo_clip"),
        rl.loss_aggregation or spec.aggregation, clip_eps_low=rl.clip_eps_low,
        clip_eps_high=rl.clip_eps_high, kl_coef=rl.kl_coef if kl_in == "loss" else 0.0,
        kl_estimator=rl.kl_estimator or spec.kl_estimator, max_tokens=max_tokens,
        temperature=cfg.rollout.temperature, entropy=rl.entropy, prefix_sharing=rl.prefix_sharing,
        loss_kwargs=rl.policy_loss_kwargs, rollout_correction=correction)


def train_policy_gradient(cfg: OnlineRLConfig, algorithm: str) -> OnlineRun:
    """Train ``cfg.train.max_steps`` RL iterations of ``algorithm`` and save the final policy."""
    prepare_run(cfg)  # before anything slow is loaded
    spec = RL_ALGORITHMS[algorithm]
    cls = ALGORITHM_CLASSES.get(algorithm, PolicyGradient)
    if spec.grouped and cfg.rollout.n < 2:
        raise ConfigError(f"rollout.n: {algorithm} compares the completions of one prompt; "
                          f"set rollout.n >= 2 (got {cfg.rollout.n})")
    if cfg.rl.max_staleness and (spec.greedy_baseline or cls is NLPO):
        raise ConfigError(f"field 'rl.max_staleness': {algorithm} samples from the current "
                          "policy inside its iteration (a greedy baseline, a masking policy), "
                          "which a rollout thread sampling ahead would race; set 0")
    if cls is NLPO and cfg.rl.critic == "shared":
        raise ConfigError("field 'rl.critic': nlpo takes a separate critic (its policy "
                          "log-probs are restricted to the action mask); use 'separate'")
    if cls is NLPO:
        refuse_ray(cfg.train, algorithm, "its masking policy rewrites the logits while the "
                   "policy samples, in this process; the rollout workers hold the policy alone")
    if cfg.rollout.backend != "builtin":
        refuse_ray(cfg.train, f"rollout.backend {cfg.rollout.backend!r}", "the rollout workers "
                   "sample with alignlab's built-in engine")
    seed_everything(cfg.train.seed)
    prompts, task = load_prompt_source(cfg.rollout, cfg.world, cfg.train.seed)
    placement = open_placement(cfg.train, algorithm)  # where rollout and reward run
    rewards = placement.rewards(functools.partial(build_reward, cfg.rl, task))
    model, tokenizer = load_policy(cfg.model, cfg.world)
    render_chat_prompts(prompts, tokenizer)
    max_new = cfg.rollout.max_new_tokens or (task.max_new_tokens if task is not None else 64)
    device = pick_device(cfg.train.device)
    # Copies of the initial policy, made before any checkpoint is loaded into it.
    reference = reference_model(model).to(device) if cfg.rl.kl_coef > 0 else None
    parts: dict[str, Any] = {}
    if issubclass(cls, PPO):
        if cfg.rl.critic == "shared":
            parts["value_head"] = value_head_for(model, device)
        else:
            parts["critic"] = PPO.separate_critic(model, cfg)
    if cls is NLPO:
        parts["action_mask"] = ActionMask(model, cfg.rl.nlpo_top_p, cfg.rl.nlpo_update_every,
                                          device)
    value_head = parts.get("value_head")
    # Dr. GRPO's constant is the generation budget: the rollout counts the eos inside it.
    objective = make_objective(spec, cfg, max_new, action_mask=parts.get("action_mask"),
                               value_head=value_head)
    learner = Learner(model, objective, cfg.train, epochs=cfg.rl.epochs,
                      minibatch_size=cfg.rl.minibatch_size, seed=cfg.train.seed,
                      extra_groups=() if value_head is None else (
                          {"params": list(value_head.parameters()),
                           "lr": cfg.rl.critic_lr or cfg.train.lr},),
                      extra_modules=() if value_head is None else (value_head,))
    mask = parts.get("action_mask")
    # Sampling ahead needs weights the update does not move: the built-in engine's own copy.
    # Under Ray the rollout workers hold copies built by the same loader.
    backend = placement.rollout_backend(
        functools.partial(load_policy, cfg.model, cfg.world), tokenizer,
        batch_size=cfg.rollout.batch_size,
        local=functools.partial(make_backend, cfg.rollout, model, tokenizer,
                                own_copy=cfg.rl.max_staleness > 0,
                                train_precision=learner.precision,
                                work_dir=Path(cfg.train.output_dir) / "rollout_adapters",
                                logits_processor=mask.processor if mask is not None else None))
    rollout = RolloutRole(model, tokenizer, max_new_tokens=max_new,
                          temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          batch_size=cfg.rollout.batch_size, backend=backend,
                          precision=learner.precision)
    alg = cls(spec, cfg, learner=learner, rollout=rollout, rewards=rewards, reference=reference,
              **parts)
    setup = OnlineSetup(prompts, rollout, learner, alg, cfg.rollout.n, cfg.rollout.prompts_per_step,
                        gold=task.gold if task is not None else None,
                        max_staleness=cfg.rl.max_staleness)
    with placement:
        result = run_online(setup, cfg.train, algorithm)
    save_final(model, tokenizer, cfg, result.output_dir)
    return OnlineRun(result, model, tokenizer)


for _name, _spec in RL_ALGORITHMS.items():
    ALGORITHMS.register(_name)(AlgorithmEntry(
        config_for(_name, RL_SECTIONS.get(_name, RLSection)),
        functools.partial(train_policy_gradient, algorithm=_name), _spec.doc))
