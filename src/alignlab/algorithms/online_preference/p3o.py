"""P3O (Wu et al. 2023, "Pairwise Proximal Policy Optimization: Harnessing Relative Feedback for
LLM Alignment"): a trajectory-wise PPO on pairs of the policy's own samples, driven by their
*relative* reward, with a clipped pairwise ratio.

Per iteration:

1. the policy (π_old) samples ``rollout.n`` completions per prompt, paired (0, 1), (2, 3), …;
2. ``judge``: one label per pair, P(y₁ ≻ y₂);
3. ``make_batches``: the relative reward of a pair is r₁ − r₂ = logit P(y₁ ≻ y₂) (the
   Bradley-Terry difference a reward judge's P encodes: (r₁ − r₂)/τ exactly; a label of 1/0
   becomes ±6.9) minus the KL penalty β·(KL₁ − KL₂), KLᵢ = log π_old(yᵢ) − log π_ref(yᵢ)
   (the KL-regularised reward the paper optimises); A = (r₁ − r₂)/2; log π_old of both from
   one no-grad pass;
4. ``epochs`` × minibatches of the clipped pairwise surrogate: ``joint`` clipping of
   ρ = π_θ(y₁)π_old(y₂)/(π_old(y₁)π_θ(y₂)) or ``separate`` clipping of each ρᵢ
   (``losses.online_preference.p3o_joint`` / ``p3o_separate``).

Only reward *differences* enter, so the update is invariant to a reward shift per prompt (the
paper's point against PPO); there is no critic. Identical pairs and pairs left unlabelled are
dropped. The paper's full text is not in ``../shared/papers/`` (only its abstract): the two
clipped objectives here are built from its pairwise policy gradient
E[(r₁ − r₂)/2 · ∇(log π(y₁) − log π(y₂))], each reducing to it at θ = θ_old (tested).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from alignlab.algorithms.online_preference.common import (
    TIE,
    MonitorFields,
    OnlinePreference,
    RoundSchedule,
    SampleObjective,
    batch_tensors,
    build_parts,
    by_prompt,
    check_on_policy,
    logit,
    run,
    sample_ids,
)
from alignlab.algorithms.registry import ALGORITHMS, AlgorithmEntry
from alignlab.core.config import (
    ModelSection,
    OnlineTrainSection,
    RolloutSection,
    Section,
    WorldSection,
)
from alignlab.engine.controller import OnlineRun
from alignlab.engine.learner import Learner, Units
from alignlab.engine.loop import LossOutput
from alignlab.losses.online_preference import ONLINE_PREFERENCE_TERMS
from alignlab.models.logprobs import completion_logprobs
from alignlab.rollout.role import Rollouts


class P3OSection(MonitorFields, RoundSchedule):
    """The judge, the clipping, the KL penalty and the iteration's training schedule (its units
    are pairs)."""

    clipping: Literal["joint", "separate"] = "joint"
    clip_eps: float = Field(0.2, gt=0, lt=1)
    kl_coef: float = Field(0.05, ge=0)
    """β of the KL-regularised reward r − β·log(π_old/π_ref)."""


class P3OConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)

    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/p3o", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=2)
    p3o: P3OSection = P3OSection()


class P3OObjective(SampleObjective):
    """Σ of the clipped pairwise surrogate over a micro-batch of pairs; ``num_items`` = pairs."""

    def __init__(self, clipping: str, clip_eps: float) -> None:
        self.term = ONLINE_PREFERENCE_TERMS.get(f"p3o_{clipping}")
        self.clip_eps = clip_eps

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        flat = completion_logprobs(model, batch)  # slot-major: all y₁, then all y₂
        b = int(batch["num_groups"])
        logps = torch.stack([flat[:b], flat[b:]], dim=1)
        old, advantages = batch_tensors(batch, logps.device, "old_logps", "advantages")
        losses = self.term(logps, old, advantages, clip_eps=self.clip_eps)
        log_ratio = (logps - old).detach()
        pair_ratio = torch.exp(log_ratio[:, 0] - log_ratio[:, 1])
        clipped = ((pair_ratio - 1).abs() > self.clip_eps).float().mean()
        return LossOutput(losses.sum(), {"clipfrac": float(clipped),
                                         "log_ratio": float(log_ratio.mean())})


@dataclass
class JudgedPairs:
    pairs: list[tuple[int, int, float]]
    """(y₁, y₂, P(y₁ ≻ y₂))"""
    ref_logps: torch.Tensor


class P3O(OnlinePreference):
    def judge(self, rows: list[dict[str, Any]], rollouts: Rollouts,
              metrics: dict[str, float]) -> JudgedPairs:
        cand = [(g[j], g[j + 1]) for g in by_prompt(rollouts) for j in range(0, len(g) - 1, 2)]
        verdicts = self.labeller.verdicts([rollouts.prompts[a] for a, _ in cand],
                                          [rollouts.completions[a] for a, _ in cand],
                                          [rollouts.completions[b] for _, b in cand], metrics)
        pairs = [(a, b, self.preference(v)) for (a, b), v in zip(cand, verdicts)
                 if v is not None and v is not TIE]
        ref = self.start_logps(rollouts, range(len(rollouts.completions)))
        self.monitor(rows, rollouts, metrics, ref)
        return JudgedPairs(pairs, ref)

    def make_batches(self, rows: list[dict[str, Any]], rollouts: Rollouts, judged: JudgedPairs,
                     metrics: dict[str, float]) -> Units | None:
        metrics["pairs"] = len(judged.pairs)
        if not judged.pairs:
            return None
        firsts, seconds = [a for a, _, _ in judged.pairs], [b for _, b, _ in judged.pairs]
        old = self.policy_logps(rollouts, firsts + seconds)
        old = torch.stack([old[:len(firsts)], old[len(firsts):]], dim=1)
        ref = judged.ref_logps
        kl = old - torch.stack([ref[firsts], ref[seconds]], dim=1)
        relative = torch.tensor([logit(p) for _, _, p in judged.pairs])
        advantages = (relative - self.section.kl_coef * (kl[:, 0] - kl[:, 1])) / 2
        metrics["relative_reward_abs"] = statistics.fmean(relative.abs().tolist())
        metrics["advantage_abs"] = statistics.fmean(advantages.abs().tolist())
        # y₁, y₂ in the two slots of a pair (collate_groups' names, not a preference order)
        examples = [{"prompt_ids": list(rollouts.prompt_ids[a]),
                     "chosen_ids": sample_ids(rollouts, a, self.eos),
                     "rejected_ids": sample_ids(rollouts, b, self.eos)} for a, b, _ in judged.pairs]
        return self.scorer.units(examples, old_logps=old, advantages=advantages)


def train_p3o(cfg: P3OConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` P3O iterations and save the final policy."""
    section = cfg.p3o
    check_on_policy(cfg.rollout, "p3o")
    parts = build_parts(cfg, section, min_n=2, name="p3o")
    learner = Learner(parts.model, P3OObjective(section.clipping, section.clip_eps), cfg.train,
                      epochs=section.epochs, minibatch_size=section.minibatch_size,
                      seed=cfg.train.seed)
    return run(parts, learner, P3O(parts, learner, section), cfg, "p3o")


ALGORITHMS.register("p3o")(AlgorithmEntry(
    P3OConfig, train_p3o,
    "P3O: pairwise PPO on the policy's own pairs, their relative reward from the judge (logit P) "
    "minus the KL difference, a clipped pairwise ratio (Wu et al. 2023)."))
