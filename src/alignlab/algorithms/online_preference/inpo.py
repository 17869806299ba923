"""INPO (Zhang et al. 2024, "Iterative Nash Policy Optimization: Aligning LLMs with General
Preferences via No-Regret Learning"): the policy plays the KL-regularised preference game against
itself with online mirror descent, each step fitted by a squared loss on judged pairs — no win
rate is estimated, one label per pair.

One controller iteration is one INPO iteration t:

1. π_t (the policy now) samples ``rollout.n`` completions per prompt, paired (0, 1), (2, 3), …
   (independent draws y, y′ ~ π_t);
2. ``judge``: one label per pair, P(y₁ ≻ y₂) (the judge's probability, or its label with
   ``preference: label``); identical pairs and pairs the judge leaves unlabelled are dropped;
3. ``make_batches``: log π_t of both samples from one no-grad pass of the policy before the
   update, log π_ref (the initial policy) from the starting model;
4. the learner minimises P·(h − η/2)² + (1 − P)·(h + η/2)²,
   h = log π_θ(y₁)/π_θ(y₂) − ητ·log π_ref(y₁)/π_ref(y₂) − (1 − ητ)·log π_t(y₁)/π_t(y₂)
   (``losses.online_preference.inpo_square``) for ``epochs`` passes, π_t frozen meanwhile. Its
   minimiser is the mirror-descent step π_{t+1} ∝ π_t^(1−ητ)·π_ref^(ητ)·exp(η·P(y ≻ π_t)).

Deviations: the paper fits each L_t to convergence on a fixed prompt set and orders each pair by
one oracle draw; here an iteration is one rollout batch and ``epochs`` passes over it, and with
``preference: probability`` the expectation over the oracle's label is taken exactly (a lower
variance, same-mean loss).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from alignlab.algorithms.online_preference.common import (
    MonitorFields,
    OnlinePreference,
    build_parts,
    run,
)
from alignlab.algorithms.online_preference.pairs import (
    Pair,
    PairObjective,
    adjacent_pairs,
    judge_pairs,
    of_pairs,
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
from alignlab.losses.online_preference import inpo_square
from alignlab.rollout.role import Rollouts


class INPOSection(MonitorFields):
    """The judge, the mirror-descent step η, the KL coefficient τ and the round's schedule."""

    eta: float = Field(2.0, gt=0)
    """η: the step of online mirror descent (the pair's target log-ratio gap is η·(P − ½))."""
    kl_coef: float = Field(0.1, ge=0)
    """τ of the KL(π‖π_ref) regulariser of the game; η·τ ≤ 1."""
    epochs: int = Field(2, gt=0)
    """Passes over the iteration's pairs (π_t stays the sampling policy)."""
    minibatch_size: int | None = Field(None, gt=0)
    """Pairs per optimizer step; None: all of them (one step per epoch)."""

    @model_validator(mode="after")
    def _check_step(self) -> INPOSection:
        if self.eta * self.kl_coef > 1:
            raise ValueError(f"inpo.kl_coef: eta * kl_coef must be <= 1 (π_t's exponent 1 − ητ "
                             f"of the mirror-descent step), got {self.eta} * {self.kl_coef}")
        return self


class INPOConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)

    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/inpo", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=2)
    inpo: INPOSection = INPOSection()


class INPOObjective(PairObjective):
    """Σ of ``inpo_square`` over a micro-batch of pairs."""

    inputs = ("old_logps", "ref_logps", "preference")

    def __init__(self, eta: float, kl_coef: float) -> None:
        self.eta, self.kl_coef = eta, kl_coef

    def terms(self, logps: torch.Tensor, *, old_logps: torch.Tensor, ref_logps: torch.Tensor,
              preference: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        losses = inpo_square(logps, old_logps, ref_logps, preference, eta=self.eta,
                             tau=self.kl_coef)
        mix = self.eta * self.kl_coef
        h = ((logps[:, 0] - logps[:, 1]) - mix * (ref_logps[:, 0] - ref_logps[:, 1])
             - (1 - mix) * (old_logps[:, 0] - old_logps[:, 1])).detach()
        # h towards the preferred sample; the fit's target for a sure preference is η/2
        return losses, {"h_preferred": float(((2 * preference - 1) * h).mean())}


@dataclass
class JudgedPairs:
    pairs: list[Pair]
    preference: list[float]
    """P(y₁ ≻ y₂) of each pair."""
    ref_logps: torch.Tensor
    """log π_ref of every sample of the iteration."""


class INPO(OnlinePreference):
    def judge(self, rows: list[dict[str, Any]], rollouts: Rollouts,
              metrics: dict[str, float]) -> JudgedPairs:
        judged = judge_pairs(self.labeller, rollouts, adjacent_pairs(rollouts), metrics)
        ref = self.start_logps(rollouts, range(len(rollouts.completions)))
        self.monitor(rows, rollouts, metrics, ref)
        return JudgedPairs([ab for ab, _ in judged], [self.preference(v) for _, v in judged], ref)

    def make_batches(self, rows: list[dict[str, Any]], rollouts: Rollouts, judged: JudgedPairs,
                     metrics: dict[str, float]) -> Units | None:
        metrics["pairs"] = len(judged.pairs)
        if not judged.pairs:
            return None
        metrics["preference_mean"] = statistics.fmean(judged.preference)
        old = pair_logps(self.policy_logps, rollouts, judged.pairs)
        ref = of_pairs(judged.ref_logps, judged.pairs)
        return self.scorer.units(pair_examples(rollouts, judged.pairs, self.eos), old_logps=old,
                                 ref_logps=ref, preference=torch.tensor(judged.preference))


def train_inpo(cfg: INPOConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` INPO iterations and save the final policy."""
    section = cfg.inpo
    parts = build_parts(cfg, section, min_n=2, name="inpo")
    learner = Learner(parts.model, INPOObjective(section.eta, section.kl_coef), cfg.train,
                      epochs=section.epochs, minibatch_size=section.minibatch_size,
                      seed=cfg.train.seed)
    return run(parts, learner, INPO(parts, learner, section), cfg, "inpo")


ALGORITHMS.register("inpo")(AlgorithmEntry(
    INPOConfig, train_inpo,
    "INPO: self-play online mirror descent on the KL-regularised preference game, each step a "
    "squared loss on judged pairs of the policy's samples, no win rates (Zhang et al. 2024)."))
