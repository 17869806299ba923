"""DNO (Rosset et al. 2024, "Direct Nash Optimization: Teaching Language Models to Self-Improve
with General Preferences"): batched on-policy self-improvement — each iteration the policy's
samples are scored by their win rate against each other under the preference function, and the
policy learns a contrastive (DPO-style) objective whose reference is the policy of that
iteration, π_t, not the SFT model.

One controller iteration is one DNO iteration t:

1. π_t (the policy now) samples K = ``rollout.n`` completions per prompt;
2. ``judge``: every pair of a prompt's samples is judged once (K(K−1)/2 labels per prompt) and
   each sample's win rate r_t(y) = P̂(y ≻ π_t) is the mean of P(y ≻ y′) over the prompt's samples
   (itself included at ½; ``common.round_robin``);
3. ``make_batches`` — ``variant: prct`` (DNO-Prct, the paper's Algorithm 2): each prompt's best
   y⁺ and worst y⁻ by r_t, kept only when r_t(y⁺) − r_t(y⁻) > ``margin`` (large-margin
   filtering), with label 1; ``variant: regression`` (Algorithm 1): every pair of the prompt's
   samples with the soft label σ(r_t(y₁) − r_t(y₂)); log π_t of both from one no-grad pass of
   the policy before the update;
4. the learner minimises −[L·log σ(η·m) + (1 − L)·log σ(−η·m)],
   m = log π_θ(y₁)/π_t(y₁) − log π_θ(y₂)/π_t(y₂) (``losses.online_preference.dno_regression``;
   label 1 is DPO with π_t as the reference) for ``epochs`` passes, π_t frozen meanwhile.

Deviations: DNO-Prct also adds the teacher's (GPT-4's) output to each prompt's candidates and
rates samples with a judge's scores; here the candidates are the policy's own samples and the
preference function is any pairwise judge. The paper trains each iteration to convergence on a
fixed prompt set; here an iteration is one rollout batch and ``epochs`` passes over it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from alignlab.algorithms.online_preference.common import (
    MonitorFields,
    OnlinePreference,
    build_parts,
    by_prompt,
    round_robin,
    run,
)
from alignlab.algorithms.online_preference.pairs import (
    Pair,
    PairObjective,
    all_pairs,
    pair_examples,
    pair_logps,
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
from alignlab.losses.online_preference import dno_regression
from alignlab.rollout.role import Rollouts


class DNOSection(MonitorFields):
    """The judge, the variant, η, the margin filter and the round's schedule."""

    variant: Literal["prct", "regression"] = "prct"
    """``prct``: best vs worst by win rate, margin-filtered, hard label (DNO-Prct);
    ``regression``: every pair of a prompt's samples, soft label σ(r₁ − r₂) (DNO)."""
    eta: float = Field(0.1, gt=0)
    """η: the log-ratios to π_t are scaled by η inside σ (DPO's β)."""
    margin: float = Field(0.25, ge=0, lt=1)
    """``prct``: a prompt's pair is kept only when r_t(y⁺) − r_t(y⁻) exceeds it."""
    epochs: int = Field(2, gt=0)
    """Passes over the iteration's pairs (π_t stays the reference)."""
    minibatch_size: int | None = Field(None, gt=0)
    """Pairs per optimizer step; None: all of them (one step per epoch)."""


class DNOConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)

    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/dno", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=4)
    dno: DNOSection = DNOSection()


class DNOObjective(PairObjective):
    """Σ of ``dno_regression`` over a micro-batch of pairs."""

    inputs = ("old_logps", "label")

    def __init__(self, eta: float) -> None:
        self.eta = eta

    def terms(self, logps: torch.Tensor, *, old_logps: torch.Tensor, label: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, float]]:
        losses = dno_regression(logps, old_logps, label, eta=self.eta)
        ratio = (logps - old_logps).detach()
        # DPO's implicit reward margin against π_t, towards the label's side
        margin = self.eta * (ratio[:, 0] - ratio[:, 1]) * (2 * label - 1)
        return losses, {"reward_margin": float(margin.mean())}


@dataclass
class WinRates:
    win_rate: list[float]
    """r_t(y) = P̂(y ≻ π_t) of every sample."""


class DNO(OnlinePreference):
    def judge(self, rows: list[dict[str, Any]], rollouts: Rollouts,
              metrics: dict[str, float]) -> WinRates:
        win = round_robin(self.labeller, rollouts, by_prompt(rollouts), self.section.preference,
                          metrics)
        self.monitor(rows, rollouts, metrics,
                     self.start_logps(rollouts, range(len(rollouts.completions))))
        return WinRates(win)

    def pairs(self, rollouts: Rollouts, win: list[float]) -> tuple[list[Pair], list[float]]:
        """The iteration's pairs and their labels (the variant's construction)."""
        if self.section.variant == "regression":
            pairs = all_pairs(rollouts)
            return pairs, [1 / (1 + math.exp(win[b] - win[a])) for a, b in pairs]
        pairs = []
        for g in by_prompt(rollouts):
            best, worst = max(g, key=win.__getitem__), min(g, key=win.__getitem__)
            if win[best] - win[worst] > self.section.margin:
                pairs.append((best, worst))
        return pairs, [1.0] * len(pairs)

    def make_batches(self, rows: list[dict[str, Any]], rollouts: Rollouts, judged: WinRates,
                     metrics: dict[str, float]) -> Units | None:
        win = judged.win_rate
        pairs, labels = self.pairs(rollouts, win)
        metrics["pairs"] = len(pairs)
        if self.section.variant == "prct":
            metrics["prompts_below_margin"] = len(rows) - len(pairs)
        if not pairs:
            return None
        metrics["win_rate_gap"] = statistics.fmean(abs(win[a] - win[b]) for a, b in pairs)
        old = pair_logps(self.policy_logps, rollouts, pairs)
        return self.scorer.units(pair_examples(rollouts, pairs, self.eos), old_logps=old,
                                 label=torch.tensor(labels))


def train_dno(cfg: DNOConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` DNO iterations and save the final policy."""
    section = cfg.dno
    parts = build_parts(cfg, section, min_n=2, name="dno")
    learner = Learner(parts.model, DNOObjective(section.eta), cfg.train, epochs=section.epochs,
                      minibatch_size=section.minibatch_size, seed=cfg.train.seed)
    return run(parts, learner, DNO(parts, learner, section), cfg, "dno")


ALGORITHMS.register("dno")(AlgorithmEntry(
    DNOConfig, train_dno,
    "DNO: batched on-policy self-improvement; samples ranked by win rate against each other, "
    "best vs worst (margin-filtered) trained contrastively with the iteration's policy as the "
    "reference (Rosset et al. 2024)."))
