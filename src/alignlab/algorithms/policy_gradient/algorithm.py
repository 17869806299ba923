"""The critic-free policy-gradient algorithms on the online controller: GRPO and its variants,
RLOO, ReMax, REINFORCE++ (``spec.py`` says which parts each one takes).

Per iteration (``engine/controller.py`` calls the hooks):

1. ``judge``: the reward role scores every completion (ReMax also samples and scores one
   greedy completion per prompt, its baseline);
2. ``make_batches``: right-padded prompt+completion rows; groups left with < 2 scored
   completions are dropped (and, with dynamic sampling, groups of equal rewards); old
   log-probs from one no-grad forward of the policy (skipped when the batch gets exactly one
   optimizer step: the ratio is then 1), reference log-probs from a frozen copy of the initial
   policy; ``advantages`` from the registered estimator, with the KL in the reward
   (r = score − β·KL, InstructGPT) or as a loss term (GRPO);
3. the learner runs PPO's clipped surrogate over epochs × minibatches of the rows.

PPO and NLPO (``ppo.py``, ``nlpo.py``) override ``advantages`` and ``after_update``.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from alignlab.algorithms.policy_gradient.config import OnlineRLConfig
from alignlab.algorithms.policy_gradient.spec import RLAlgorithm
from alignlab.engine import distributed
from alignlab.engine.controller import OnlineAlgorithm, Rows
from alignlab.engine.learner import Learner, Units, rows_of
from alignlab.engine.scoring import score_units
from alignlab.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    kl_shaped_rewards,
    scores_to_token_rewards,
)
from alignlab.losses.kl import token_kl
from alignlab.models.logprobs import token_logprobs
from alignlab.rewards.scoring import RewardRole, RewardScores, token_reward_tensor
from alignlab.rollout.role import RolloutRole, Rollouts

Experience = dict[str, torch.Tensor]
ADVANTAGE_INPUTS = ("loss_mask", "scores", "group_ids", "baseline_scores", "token_rewards",
                    "old_logprobs", "ref_logprobs")
"""What ``estimator_advantages`` reads of a rollout batch."""


class PolicyGradient(OnlineAlgorithm):
    """One of ``RL_ALGORITHMS`` (``spec``) as controller hooks."""

    def __init__(self, spec: RLAlgorithm, cfg: OnlineRLConfig, *, learner: Learner,
                 rollout: RolloutRole, rewards: RewardRole,
                 reference: torch.nn.Module | None) -> None:
        self.spec, self.cfg, self.rl = spec, cfg, cfg.rl
        self.learner, self.rollout, self.rewards, self.reference = learner, rollout, rewards, reference
        self.kl_in = self.rl.kl_in or spec.kl_in
        self.kl_estimator = self.rl.kl_estimator or spec.kl_estimator
        self.dropped_total = 0

    # ------------------------------------------------------------------------------ hooks

    def judge(self, rows: Rows, rollouts: Rollouts, metrics: dict[str, float]
              ) -> tuple[RewardScores, torch.Tensor | None]:
        """The rollouts' reward scores, and (ReMax) each completion's greedy baseline score."""
        fields = {k: [rows[i].get(k) for i in rollouts.prompt_index]
                  for k in rows[0] if k != "prompt"}
        scored = self.rewards.score(rollouts.prompts, rollouts.completions, fields,
                                    rollouts.completion_ids)
        baseline = None
        if self.spec.greedy_baseline:
            prompts = [r["prompt"] for r in rows]
            greedy = self.rollout.generate(prompts, 1, seed=0, greedy=True)
            g = self.rewards.score(greedy.prompts, greedy.completions,
                                   {k: [r.get(k) for r in rows] for k in fields},
                                   greedy.completion_ids)
            baseline = torch.tensor([g.scores[i] for i in rollouts.prompt_index])
            metrics["greedy_reward_mean"] = statistics.fmean(g.scores)
        metrics["reward_skipped"] = scored.skipped
        metrics.update(scored.metrics)
        return scored, baseline

    def make_batches(self, rows: Rows, rollouts: Rollouts,
                     judged: tuple[RewardScores, torch.Tensor | None],
                     metrics: dict[str, float]) -> Units | None:
        scored, baseline = judged
        exp = self.rollout.to_batch(rollouts)
        if scored.token_rewards is not None:
            exp["token_rewards"] = token_reward_tensor(scored.token_rewards, exp["loss_mask"])
        exp["scores"] = torch.tensor(scored.scores, dtype=torch.float32)
        exp["group_ids"] = torch.tensor(rollouts.prompt_index)
        if baseline is not None:
            exp["baseline_scores"] = baseline
        keep = self._keep(torch.tensor(scored.valid), exp, baseline, metrics)
        valid = exp["scores"][keep]
        metrics["reward_mean"] = float(valid.mean()) if len(valid) else float("nan")
        metrics["reward_std"] = float(valid.std()) if len(valid) > 1 else 0.0
        empty = int(keep.sum()) == 0
        if empty and not distributed.active():
            return None
        exp = {k: v[keep] for k, v in exp.items()}
        if not empty:
            self._add_logprobs(exp, metrics)
        # With N processes the advantages gather every rank's rows: a rank left with none
        # still takes part (and then has nothing to learn from).
        metrics.update(self.advantages(exp))
        if empty:
            return None
        for key in ("scores", "group_ids", "baseline_scores", "token_rewards"):
            exp.pop(key, None)
        return rows_of(exp)

    def progress_info(self, metrics: dict[str, float]) -> str:
        return f"reward {metrics.get('reward_mean', float('nan')):.3f}"

    def state_dict(self) -> dict[str, Any]:
        return self.rank_state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_rank_state_dict(state)

    def rank_state_dict(self) -> dict[str, Any]:
        """Counters of this process's prompts (each rank's own with N processes)."""
        return {"reward_skipped": self.rewards.total_skipped, "dropped_groups": self.dropped_total}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        self.rewards.total_skipped = int(state.get("reward_skipped", 0))
        self.dropped_total = int(state.get("dropped_groups", 0))

    # ------------------------------------------------------------------------------ parts

    def advantages(self, exp: Experience) -> dict[str, float]:
        """Put ``advantages [B,T]`` into ``exp`` (``estimator_advantages``), computed over the
        rows of every process as one batch (REINFORCE++ whitens over all of them)."""
        def fn(rows: Experience) -> tuple[Experience, dict[str, float]]:
            advantages, metrics = estimator_advantages(self.spec, self.rl, rows)
            return {"advantages": advantages}, metrics

        inputs = {k: exp[k] for k in ADVANTAGE_INPUTS if k in exp}
        out, metrics = distributed.whole_batch(fn, inputs, offset_keys=("group_ids",))
        exp["advantages"] = out.get("advantages", torch.zeros(exp["loss_mask"].shape))
        return metrics or {}

    def _keep(self, keep: torch.Tensor, exp: Experience, baseline: torch.Tensor | None,
              metrics: dict[str, float]) -> torch.Tensor:
        """Rows to train on: scored, with a finite baseline, in a group that can compare."""
        if baseline is not None:
            keep &= torch.isfinite(baseline)
        dropped = 0
        if self.spec.grouped:
            keep, dropped = keep_groups(keep, exp["scores"], exp["group_ids"],
                                        self.rl.dynamic_sampling)
            self.dropped_total += dropped
        metrics["dropped_groups"] = dropped
        metrics["dropped_groups_total"] = self.dropped_total
        return keep

    def _add_logprobs(self, exp: Experience, metrics: dict[str, float]) -> None:
        """``old_logprobs`` (when the policy changes within the iteration or a KL needs them)
        and ``ref_logprobs`` (with a reference), each from one no-grad pass."""
        n, rl = exp["input_ids"].shape[0], self.rl
        one_step = rl.epochs == 1 and (rl.minibatch_size or n) >= n
        if self.reference is None and one_step:
            return
        exp["old_logprobs"] = self.policy_logprobs(exp)
        if self.reference is not None:
            exp["ref_logprobs"] = self.logprobs(self.reference, exp, token_logprobs_plain(
                self.cfg.rollout.temperature, rl.prefix_sharing))
            metrics["kl_ref"] = float(token_kl(exp["old_logprobs"], exp["ref_logprobs"], "k1",
                                               exp["loss_mask"]).sum(-1).mean())

    def policy_logprobs(self, exp: Experience) -> torch.Tensor:
        """log π(y_t) of the rollout rows as the objective defines the policy (no gradient)."""
        return self.logprobs(self.learner.model, exp, self.learner.objective.policy_logprobs)

    def logprobs(self, model: torch.nn.Module, exp: Experience, fn: Any) -> torch.Tensor:
        tensors = {k: v for k, v in exp.items() if v.dim() == 2}
        return score_units(model, rows_of(tensors), fn, device=self.learner.device,
                           micro_batch_size=self.learner.micro_batch_size)


def token_logprobs_plain(temperature: float, prefix_sharing: bool) -> Any:
    """The plain softmax's per-token log-probs (a reference model's), as a scoring function."""
    def fn(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return token_logprobs(model, batch, temperature=temperature, prefix_sharing=prefix_sharing)
    return fn


def keep_groups(keep: torch.Tensor, scores: torch.Tensor, group_ids: torch.Tensor,
                dynamic_sampling: bool) -> tuple[torch.Tensor, int]:
    """Drop groups left with < 2 scored completions, and (dynamic sampling, DAPO) groups whose
    rewards are all equal: they carry no gradient."""
    keep = keep.clone()
    dropped = 0
    for g in group_ids.unique():
        rows = (group_ids == g) & keep
        s = scores[rows]
        if len(s) < 2 or (dynamic_sampling and float(s.max() - s.min()) == 0.0):
            keep &= ~(group_ids == g)
            dropped += 1
    return keep, dropped


def estimator_advantages(spec: RLAlgorithm, rl: Any, exp: Experience
                         ) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages ``[B,T]`` from ``spec``'s registered estimator, the KL placed in the reward
    when the algorithm/config says so (r = score − β·KL).

    ``exp`` holds ``loss_mask``, ``scores [B]``, ``group_ids [B]`` and, when present,
    ``baseline_scores [B]``, ``token_rewards [B,T]`` (per-token reward components, already summed
    into ``scores``: a token-level estimator gets them in place, the rest of each score on the
    last token) and ``old_logprobs``/``ref_logprobs`` (for the KL)."""
    mask, scores, token_rewards = exp["loss_mask"], exp["scores"], exp.get("token_rewards")
    kwargs: dict[str, Any] = {"mask": mask}
    metrics: dict[str, float] = {}
    if (rl.kl_in or spec.kl_in) == "reward" and rl.kl_coef > 0:
        rewards, kl = kl_shaped_rewards(scores, exp["old_logprobs"], exp["ref_logprobs"], mask,
                                        rl.kl_coef, rl.kl_estimator or spec.kl_estimator,
                                        token_rewards)
        metrics["kl_penalty"] = float(rl.kl_coef * kl.sum(-1).mean())
        if spec.token_rewards:
            kwargs["rewards"] = rewards
        else:  # a sequence estimator: the KL-shaped return of the whole completion
            kwargs["scores"] = rewards.sum(-1)
    elif spec.token_rewards and token_rewards is not None:
        kwargs["rewards"] = scores_to_token_rewards(scores, mask, token_rewards)
    else:
        kwargs["scores"] = scores
    if spec.grouped:
        kwargs["group_ids"] = exp["group_ids"]
    if spec.advantage == "grpo":
        kwargs["scale_rewards"] = rl.scale_rewards
    if "baseline_scores" in exp:
        kwargs["baseline_scores"] = exp["baseline_scores"]
    advantages, _ = ADVANTAGE_ESTIMATORS.get(spec.advantage)(**kwargs)
    return advantages, metrics
