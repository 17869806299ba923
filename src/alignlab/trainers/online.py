"""The online-RL controller: rollout → reward → advantages → update, once per iteration.

One loop serves every algorithm of ``rl_algorithms.RL_ALGORITHMS``; it passes plain data
between the three roles of ``online_roles`` (rollout, reward, policy), plus, for PPO and NLPO,
the critic, KL controller and action mask of ``ppo.PPOParts``. Old
log-probs come from one no-grad forward of the policy before the update (as TRL), reference
log-probs from a frozen copy of the initial policy. With ``kl_in: reward`` the rewards are
r_t = 1[t=last]·score − β·KL_t (InstructGPT); with ``kl_in: loss`` β·KL_t is added to the
per-token policy loss (GRPO).
"""

from __future__ import annotations

import copy
import functools
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, create_model, field_validator, model_validator

from alignlab.config import ModelSection, Section, TrainSection, WorldSection
from alignlab.errors import ConfigError
from alignlab.losses.advantages import (ADVANTAGE_ESTIMATORS, kl_shaped_rewards,
                                        scores_to_token_rewards)
from alignlab.losses.kl import token_kl
from alignlab.rewards.sandbox import Limits
from alignlab.trainers.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignlab.trainers.loop import Progress, TrainResult
from alignlab.trainers.metrics import MetricsLogger
from alignlab.trainers.nlpo import ActionMask, MaskedPolicyObjective, masked_rollout_role
from alignlab.trainers.online_roles import PolicyObjective, PolicyRole, RolloutRole
from alignlab.trainers.reward_role import RewardRole, resolve_reward, token_reward_tensor
from alignlab.trainers.rl_algorithms import RL_ALGORITHMS, RLAlgorithm
from alignlab.utils.io import atomic_write_text
from alignlab.utils.runtime import seed_everything

WORLD = "world:"


class RolloutSection(Section):
    prompts: str = "world:positive"
    """``world:<task>`` (the task's train prompts) or a JSONL/Parquet file of ``prompt_only`` rows
    (extra columns are passed to reward functions as fields)."""
    prompts_per_step: int = Field(8, gt=0)
    n: int = Field(4, gt=0)
    """Completions per prompt (the group size)."""
    max_new_tokens: int | None = Field(None, gt=0)
    """Defaults to the world task's suggestion, else 64."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(64, gt=0)


class RewardSandboxSection(Section):
    timeout_s: float | None = Field(None, gt=0)
    """Wall-clock seconds per call before the worker is killed; default ``rl.reward_timeout_s``,
    else 60."""
    memory_mb: int | None = Field(4096, gt=0)
    """Address-space (virtual memory) limit of the worker in MiB (null: none)."""


class RLSection(Section):
    reward: str | dict[str, float] = "gold"
    """``gold``, a registered reward, ``module:function``, or ``{name: weight, ...}``."""
    reward_params: dict[str, dict[str, Any]] = {}
    on_reward_error: Literal["stop", "skip"] = "stop"
    """A reward that raises, times out or returns NaN/inf/None: stop the run (naming the reward
    and the first offending sample) or skip those samples (counted as ``reward_skipped``)."""
    reward_timeout_s: float | None = Field(None, gt=0)
    """Seconds one reward component may take per batch (null: no limit); an overrun is handled
    by ``on_reward_error``. In-process calls are abandoned, not killed (``reward_role.py``)."""
    reward_sandbox: dict[str, RewardSandboxSection] = {}
    """Reward components (names from ``rl.reward``) to call in a subprocess worker, killed after
    ``timeout_s`` and memory-capped; arguments and results cross as JSON (``rewards/worker.py``)."""
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    """Defaults to the algorithm's (k3 for grpo, k1 otherwise)."""
    kl_in: Literal["loss", "reward"] | None = None
    epochs: int = Field(1, gt=0)
    minibatch_size: int | None = Field(None, gt=0)
    """Completions per optimizer step; default: the whole rollout batch (one step per epoch)."""
    clip_eps_low: float = Field(0.2, gt=0)
    clip_eps_high: float | None = Field(None, gt=0)
    importance: Literal["token", "sequence"] = "token"
    """``sequence``: GSPO's sequence-level ratio (grpo)."""
    loss_aggregation: Literal["grpo", "dr_grpo", "dapo", "bnpo", "token_mean",
                              "seq_mean_token_mean", "seq_mean_token_sum_norm"] | None = None
    scale_rewards: Literal["group", "batch", "none"] = "group"
    dynamic_sampling: bool = False
    """Drop groups whose rewards have zero variance (DAPO); they carry no gradient."""
    entropy: bool = False
    """Log the policy's entropy (one extra softmax per token)."""
    prefix_sharing: bool = True
    """Compute the policy's and the reference's log-probs with every distinct prompt once and
    no padding work (``models/shared_tokens.py``) where the model allows it (an SDPA decoder);
    the values equal the plain path up to float rounding."""


class RLTrainSection(TrainSection):
    """``TrainSection`` with online-RL defaults; ``max_steps`` counts RL iterations (one rollout
    batch each), and the LR schedule advances once per iteration."""

    output_dir: str = "runs/rl"
    max_steps: int = Field(100, gt=0)
    lr: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    log_every: int = Field(1, gt=0)


class OnlineRLConfig(Section):
    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: RLTrainSection = RLTrainSection()
    rollout: RolloutSection = RolloutSection()
    rl: RLSection = RLSection()

    @field_validator("train", mode="before")
    @classmethod
    def _from_train_section(cls, value: Any) -> Any:
        # A plain TrainSection from Python code: keep what it set, RL defaults for the rest.
        if isinstance(value, TrainSection) and not isinstance(value, RLTrainSection):
            return value.model_dump(exclude_unset=True)
        return value

    @model_validator(mode="after")
    def _check(self) -> "OnlineRLConfig":
        if isinstance(self.rl.reward, dict) and not self.rl.reward:
            raise ValueError("rl.reward: give at least one reward name")
        if self.train.grad_accum != 1:
            raise ValueError("train.grad_accum is not used by online RL: rl.minibatch_size sets "
                             "the completions per optimizer step, train.batch_size the "
                             "micro-batch; leave grad_accum at 1")
        return self


def _config_for(name: str, rl_cls: type[RLSection] = RLSection) -> type[OnlineRLConfig]:
    """The config class of one algorithm: the same sections (``rl`` may add fields), and
    ``runs/<name>`` as output_dir."""
    train_cls = create_model(f"{name.capitalize()}TrainSection", __base__=RLTrainSection,
                             output_dir=(str, f"runs/{name}"))
    return create_model(f"{name.capitalize()}Config", __base__=OnlineRLConfig,
                        train=(train_cls, train_cls()), rl=(rl_cls, rl_cls()))


# ---------------------------------------------------------------------------------- prompts


class PromptSource:
    """Prompts (and row fields) for iteration ``i``: a fresh seeded permutation each pass."""

    def __init__(self, rows: list[dict[str, Any]], seed: int) -> None:
        if not rows:
            raise ConfigError("rollout.prompts: no prompts")
        self.rows, self.seed = rows, seed

    def batch(self, iteration: int, k: int) -> list[dict[str, Any]]:
        out, n = [], len(self.rows)
        for j in range(iteration * k, (iteration + 1) * k):
            order = list(range(n))
            random.Random(self.seed * 100_003 + j // n).shuffle(order)
            out.append(self.rows[order[j % n]])
        return out


def load_prompts(cfg: OnlineRLConfig) -> tuple[PromptSource, Any]:
    """(the prompt source, the world task or None)."""
    src = cfg.rollout.prompts
    if src.startswith(WORLD):
        from alignlab.trainers.common import get_world

        try:
            task = get_world(cfg.world).task(src[len(WORLD):])
        except ConfigError as exc:
            raise ConfigError(f"rollout.prompts: {exc}") from None
        return PromptSource([{"prompt": p} for p in task.train_prompts], cfg.train.seed), task
    from alignlab.data.loading import load_rows

    rows = load_rows(src, format="prompt_only")
    return PromptSource([dict(r) for r in rows], cfg.train.seed), None


def build_reward(cfg: RLSection, task: Any) -> RewardRole:
    weights = cfg.reward if isinstance(cfg.reward, dict) else {cfg.reward: 1.0}
    for option in ("reward_params", "reward_sandbox"):
        unknown = sorted(set(getattr(cfg, option)) - set(weights))
        if unknown:
            raise ConfigError(f"rl.{option}: {unknown} are not rewards in rl.reward")
    limits = {name: Limits(timeout_s=box.timeout_s or cfg.reward_timeout_s or 60.0,
                           memory_mb=box.memory_mb, max_output_bytes=64 << 20)
              for name, box in cfg.reward_sandbox.items()}
    return RewardRole({name: (w, resolve_reward(name, task, cfg.reward_params.get(name),
                                                sandbox=limits.get(name)))
                       for name, w in weights.items()}, cfg.on_reward_error, cfg.reward_timeout_s)


# ---------------------------------------------------------------------------------- controller


@dataclass
class OnlineRun:
    result: TrainResult
    model: torch.nn.Module
    tokenizer: Any


def make_objective(alg: RLAlgorithm, cfg: OnlineRLConfig, max_tokens: int,
                   action_mask: ActionMask | None = None,
                   value_head: torch.nn.Module | None = None) -> PolicyObjective:
    """The policy's objective; with NLPO's ``action_mask`` its log-probs are those of π^M; with
    a shared critic's ``value_head`` it adds the value loss (``shared_critic.py``)."""
    rl = cfg.rl
    kl_in = rl.kl_in or alg.kl_in
    if value_head is not None:
        from alignlab.trainers.shared_critic import SharedCriticObjective

        cls = functools.partial(SharedCriticObjective, value_head, rl.vf_coef, rl.value_clip_eps)
    elif action_mask is not None:
        cls = functools.partial(MaskedPolicyObjective, action_mask)
    else:
        cls = PolicyObjective
    return cls(
        "gspo" if rl.importance == "sequence" else "ppo_clip",
        rl.loss_aggregation or alg.aggregation, clip_eps_low=rl.clip_eps_low,
        clip_eps_high=rl.clip_eps_high, kl_coef=rl.kl_coef if kl_in == "loss" else 0.0,
        kl_estimator=rl.kl_estimator or alg.kl_estimator, max_tokens=max_tokens,
        temperature=cfg.rollout.temperature, entropy=rl.entropy, prefix_sharing=rl.prefix_sharing)


def compute_advantages(alg: RLAlgorithm, cfg: OnlineRLConfig, exp: dict[str, torch.Tensor],
                       scores: torch.Tensor, group_ids: torch.Tensor,
                       baseline_scores: torch.Tensor | None,
                       token_rewards: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages [B,T] with the KL placed in the reward when the algorithm/config says so.

    ``token_rewards [B,T]`` (per-token reward components) are already summed into ``scores``;
    a token-level estimator gets them in place, the rest of the score on the last token."""
    rl, mask = cfg.rl, exp["loss_mask"]
    kl_in = rl.kl_in or alg.kl_in
    kwargs: dict[str, Any] = {"mask": mask}
    metrics: dict[str, float] = {}
    if kl_in == "reward" and rl.kl_coef > 0:
        rewards, kl = kl_shaped_rewards(scores, exp["old_logprobs"], exp["ref_logprobs"], mask,
                                        rl.kl_coef, rl.kl_estimator or alg.kl_estimator,
                                        token_rewards)
        metrics["kl_penalty"] = float(rl.kl_coef * kl.sum(-1).mean())
        if alg.token_rewards:
            kwargs["rewards"] = rewards
        else:  # a sequence estimator: the KL-shaped return of the whole completion
            kwargs["scores"] = rewards.sum(-1)
    elif alg.token_rewards and token_rewards is not None:
        kwargs["rewards"] = scores_to_token_rewards(scores, mask, token_rewards)
    else:
        kwargs["scores"] = scores
    if alg.grouped:
        kwargs["group_ids"] = group_ids
    if alg.advantage == "grpo":
        kwargs["scale_rewards"] = rl.scale_rewards
    if baseline_scores is not None:
        kwargs["baseline_scores"] = baseline_scores
    advantages, _ = ADVANTAGE_ESTIMATORS.get(alg.advantage)(**kwargs)
    return advantages, metrics


def _select(exp: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[keep] for k, v in exp.items()}


def run_online(cfg: OnlineRLConfig, algorithm: str) -> OnlineRun:
    """Train ``cfg.train.max_steps`` RL iterations of ``algorithm`` and save the final policy."""
    from alignlab.trainers.common import load_policy, save_final

    alg = RL_ALGORITHMS[algorithm]
    if alg.grouped and cfg.rollout.n < 2:
        raise ConfigError(f"rollout.n: {algorithm} compares the completions of one prompt; "
                          f"set rollout.n >= 2 (got {cfg.rollout.n})")
    seed_everything(cfg.train.seed)
    sources, task = load_prompts(cfg)
    reward_role = build_reward(cfg.rl, task)
    model, tokenizer = load_policy(cfg.model, cfg.world)
    max_new = cfg.rollout.max_new_tokens or (task.max_new_tokens if task is not None else 64)
    needs_ref = cfg.rl.kl_coef > 0
    # Before any checkpoint is loaded, so a resumed run keeps the *initial* policy as reference.
    reference = copy.deepcopy(model).requires_grad_(False).eval() if needs_ref else None
    ppo = None
    if alg.critic:  # also before any checkpoint: the critic starts from the initial policy
        from alignlab.trainers.ppo import PPOParts

        ppo = PPOParts(cfg, model, cfg.rl.kl_estimator or alg.kl_estimator, alg.action_mask)
    action_mask = ppo.action_mask if ppo is not None else None
    # +1: the eos is a trained token too
    value_head = ppo.value_head if ppo is not None else None
    objective = make_objective(alg, cfg, max_new + 1, action_mask, value_head)
    policy = PolicyRole(model, objective, cfg.train, epochs=cfg.rl.epochs,
                        minibatch_size=cfg.rl.minibatch_size, seed=cfg.train.seed,
                        extra_groups=() if value_head is None else (
                            {"params": list(value_head.parameters()),
                             "lr": cfg.rl.critic_lr or cfg.train.lr},))
    if reference is not None:
        reference.to(policy.device)
    rollout_cls = RolloutRole if action_mask is None else masked_rollout_role(action_mask)
    rollout = rollout_cls(model, tokenizer, max_new_tokens=max_new,
                          temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          batch_size=cfg.rollout.batch_size)

    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    ckpt = latest_checkpoint(out) if cfg.train.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model)
        policy.load_state_dict(state["policy"])
        reward_role.total_skipped = int(state.get("reward_skipped", 0))
        if ppo is not None:
            ppo.load_state_dict(state["ppo"])
        start = int(state["step"])
    logger = MetricsLogger(out, tensorboard=cfg.train.tensorboard)
    progress = Progress(cfg.train.max_steps, start, cfg.train.progress, algorithm)
    t_run = time.time()
    dropped_total = 0
    try:
        for it in range(start, cfg.train.max_steps):
            rows = sources.batch(it, cfg.rollout.prompts_per_step)
            prompts = [r["prompt"] for r in rows]
            t0 = time.time()
            if ppo is not None:
                ppo.begin_iteration(model, it)
            rollout.sync_weights()
            rolls = rollout.generate(prompts, cfg.rollout.n, seed=cfg.train.seed * 7919 + it)
            greedy = (rollout.generate(prompts, 1, seed=0, greedy=True)
                      if alg.greedy_baseline else None)
            t1 = time.time()
            fields = {k: [rows[i].get(k) for i in rolls.prompt_index]
                      for k in rows[0] if k != "prompt"}
            scored = reward_role.score(rolls.prompts, rolls.completions, fields,
                                       rolls.completion_ids)
            m: dict[str, float] = {}
            baseline = None
            if greedy is not None:
                g = reward_role.score(greedy.prompts, greedy.completions,
                                      {k: [r.get(k) for r in rows] for k in fields},
                                      greedy.completion_ids)
                baseline = torch.tensor([g.scores[i] for i in rolls.prompt_index])
                m["greedy_reward_mean"] = statistics.fmean(g.scores)
            if task is not None:
                m["gold_mean"] = statistics.fmean(task.gold(rolls.prompts, rolls.completions))
            t2 = time.time()

            exp = rollout.to_batch(rolls)
            if scored.token_rewards is not None:  # kept aligned with exp through _select
                exp["token_rewards"] = token_reward_tensor(scored.token_rewards, exp["loss_mask"])
            scores = torch.tensor(scored.scores, dtype=torch.float32)
            group_ids = torch.tensor(rolls.prompt_index)
            keep = torch.tensor(scored.valid)
            if baseline is not None:
                keep &= torch.isfinite(baseline)
            dropped = 0
            if alg.grouped:
                keep, dropped = _keep_groups(keep, scores, group_ids, cfg.rl.dynamic_sampling)
                dropped_total += dropped
            valid = scores[keep]
            m.update({"reward_mean": float(valid.mean()) if len(valid) else float("nan"),
                      "reward_std": float(valid.std()) if len(valid) > 1 else 0.0,
                      "response_length": statistics.fmean(map(len, rolls.completion_ids)),
                      "frac_hit_length_limit": rolls.finish_reasons.count("length") / len(rolls.finish_reasons),
                      "dropped_groups": dropped, "dropped_groups_total": dropped_total,
                      "reward_skipped": scored.skipped, **scored.metrics})
            if m["frac_hit_length_limit"] > 0.5:
                print(f"warning: iteration {it + 1}: {m['frac_hit_length_limit']:.0%} of completions "
                      f"hit rollout.max_new_tokens={max_new}; their rewards may be meaningless")
            if int(keep.sum()) == 0:
                m["update_skipped"] = 1
            else:
                exp = _select(exp, keep)
                scores, group_ids = scores[keep], group_ids[keep]
                baseline = baseline[keep] if baseline is not None else None
                n_rows = int(keep.sum())
                one_step = cfg.rl.epochs == 1 and (cfg.rl.minibatch_size or n_rows) >= n_rows
                if reference is not None or not one_step:
                    exp["old_logprobs"] = policy.logprobs(exp, temperature=cfg.rollout.temperature)
                if reference is not None:
                    exp["ref_logprobs"] = policy.logprobs(exp, reference, cfg.rollout.temperature)
                    m["kl_ref"] = float((token_kl(exp["old_logprobs"], exp["ref_logprobs"], "k1",
                                                  exp["loss_mask"])).sum(-1).mean())
                token_rewards = exp.pop("token_rewards", None)
                if ppo is None:
                    exp["advantages"], extra = compute_advantages(
                        alg, cfg, exp, scores, group_ids, baseline, token_rewards)
                else:  # values, β-shaped rewards, GAE
                    extra = ppo.add_advantages(exp, scores, token_rewards)
                m.update(extra)
                m.update(policy.update(exp))
                if ppo is not None:
                    m.update(ppo.update_critic(exp))
            t3 = time.time()
            m.update({"time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2})
            step = it + 1
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                logger.log(step, m)
            progress.update(f"reward {m['reward_mean']:.3f}")
            if cfg.train.save_every and (step % cfg.train.save_every == 0
                                         or step == cfg.train.max_steps):
                save_checkpoint(out, step, model, {"policy": policy.state_dict(),
                                                   "reward_skipped": reward_role.total_skipped,
                                                   **({"ppo": ppo.state_dict()} if ppo else {})},
                                keep=cfg.train.save_total_limit)
    finally:
        progress.close()
        logger.close()
    seconds = time.time() - t_run  # the training loop; loading and the final save excluded
    atomic_write_text(out / "DONE", f"{cfg.train.max_steps}\n")
    save_final(model, tokenizer, cfg, out)
    result = TrainResult(cfg.train.max_steps, logger.history, out, seconds)
    return OnlineRun(result, model, tokenizer)


def _keep_groups(keep: torch.Tensor, scores: torch.Tensor, group_ids: torch.Tensor,
                 dynamic_sampling: bool) -> tuple[torch.Tensor, int]:
    """Drop groups left with < 2 scored completions, and (dynamic sampling) zero-variance ones."""
    keep = keep.clone()
    dropped = 0
    for g in group_ids.unique():
        rows = (group_ids == g) & keep
        s = scores[rows]
        if len(s) < 2 or (dynamic_sampling and float(s.max() - s.min()) == 0.0):
            keep &= ~(group_ids == g)
            dropped += 1
    return keep, dropped


def _register() -> None:
    from alignlab.trainers.registry import ALGORITHMS, AlgorithmEntry
    # Here, not at the top: ppo.py builds its config sections on this module's RLSection.
    from alignlab.trainers.ppo import RL_SECTIONS

    for name, alg in RL_ALGORITHMS.items():
        ALGORITHMS.register(name)(AlgorithmEntry(
            _config_for(name, RL_SECTIONS.get(name, RLSection)),
            functools.partial(run_online, algorithm=name), alg.doc))


_register()
