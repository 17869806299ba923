"""EGPO (Zhou et al. 2025, "Extragradient Preference Optimization (EGPO): Beyond Last-Iterate
Convergence for Nash Learning from Human Feedback"): extragradient on the KL-regularised
preference game, each half step a gradient step of an online IPO loss — first an extrapolation
from θ_t to θ_{t+1/2}, then the update from θ_t again, driven by the game at θ_{t+1/2}.

One controller iteration is one EGPO iteration t:

1. π_t (the policy now) samples ``rollout.n`` completions per prompt, paired (0, 1), (2, 3), …;
2. ``judge``: the win-rate margin Δ ≈ P(y₁ ≻ π) − P(y₂ ≻ π) of each pair — ``estimate: pair``:
   P(y₁ ≻ y₂) − ½, one label per pair (the released code's lower-variance form, y₂ standing in
   for the opponent sample); ``round_robin``: the difference of the two samples' win rates
   against all of the prompt's samples (K(K−1)/2 labels per prompt);
3. ``make_batches``, the extragradient:
   a. snapshot θ_t and the optimizer's state;
   b. extrapolation: one optimizer step on the online IPO loss
      (log π_θ(y₁)/π_ref(y₁) − log π_θ(y₂)/π_ref(y₂) − Δ/τ)² of π_t's pairs
      (``losses.online_preference.online_ipo``) → θ_{t+1/2};
   c. π_{t+1/2} samples the same prompts and its pairs are judged as in 2;
   d. back to the snapshot; the controller's update is one optimizer step from θ_t on the
      online IPO loss of π_{t+1/2}'s pairs → θ_{t+1}.

As in the paper's code (its tabular ``extragradient`` and its language-model trainer), the update
step's gradient is taken at θ_t, the extrapolated point entering through the game — the samples
and the preferences of π_{t+1/2}; in the tabular case this is exactly the extragradient update
π_{t+1} ∝ π_t^(1−ητ)·π_ref^(ητ)·exp(η·P(· ≻ π_{t+1/2})). What is approximated: the expectations
over y, y′ (and the opponent) are one batch of samples; each half step is one step of the
configured optimizer (AdamW by default, a preconditioned step rather than the paper's plain
gradient step), the extrapolation step's change to the optimizer state is discarded with its
weights (as the paper's code does), and the LR schedule advances once per iteration, so both
half steps use the same η. Samples come from π_θ itself (the paper's code can also draw them
from a geometric mixture with π_ref; not here). Each iteration labels two rounds of pairs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from alignlab.algorithms.online_preference.common import (
    MonitorFields,
    OnlinePreference,
    Parts,
    build_parts,
    by_prompt,
    round_robin,
    run,
)
from alignlab.algorithms.online_preference.pairs import (
    Pair,
    PairObjective,
    adjacent_pairs,
    judge_pairs,
    of_pairs,
    pair_examples,
)
from alignlab.algorithms.registry import ALGORITHMS, AlgorithmEntry
from alignlab.core.config import (
    ModelSection,
    OnlineTrainSection,
    RolloutSection,
    Section,
    WorldSection,
)
from alignlab.engine import distributed
from alignlab.engine.controller import OnlineRun, gathered
from alignlab.engine.learner import Learner, Units
from alignlab.losses.online_preference import online_ipo
from alignlab.rollout.role import Rollouts

EXTRAPOLATED_SAMPLES = 3_000_003
"""Seed offset of π_{t+1/2}'s samples (apart from the controller's and ``common``'s)."""


def _no_rows(idx: torch.Tensor) -> dict[str, Any]:
    raise AssertionError("a rank without pairs was asked for a micro-batch")


NO_UNITS = Units(0, _no_rows)
"""A rank's share of an update it has no pairs for (the learner pads it under sharding)."""


class EGPOSection(MonitorFields):
    """The judge, the KL coefficient τ and how the win-rate margin is estimated."""

    kl_coef: float = Field(0.2, gt=0)
    """τ of the KL(π‖π_ref) regulariser: the log-ratio margin's target is Δ/τ."""
    estimate: Literal["pair", "round_robin"] = "pair"
    """Δ from the pair's own label (P(y₁ ≻ y₂) − ½) or from round-robin win rates."""


class EGPOConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp, zero1/2 (engine/sharding.py)

    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/egpo", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=2)
    egpo: EGPOSection = EGPOSection()


class EGPOObjective(PairObjective):
    """Σ of ``online_ipo`` over a micro-batch of pairs."""

    inputs = ("ref_logps", "win_margin")

    def __init__(self, kl_coef: float) -> None:
        self.kl_coef = kl_coef

    def terms(self, logps: torch.Tensor, *, ref_logps: torch.Tensor, win_margin: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, float]]:
        losses = online_ipo(logps, ref_logps, win_margin, kl_coef=self.kl_coef)
        ratio = (logps - ref_logps).detach()
        # the log-ratio margin on the winning side (its target is |Δ|/τ)
        margin = (ratio[:, 0] - ratio[:, 1]) * torch.sign(win_margin)
        return losses, {"log_ratio_margin": float(margin.mean())}


@dataclass
class GamePairs:
    """One policy's judged pairs: (y₁, y₂), Δ of each, log π_ref of every sample."""

    pairs: list[Pair]
    win_margin: list[float]
    ref_logps: torch.Tensor


class EGPO(OnlinePreference):
    def __init__(self, parts: Parts, learner: Learner, section: EGPOSection, *,
                 seed: int) -> None:
        super().__init__(parts, learner, section)
        self.seed = seed

    def game(self, rollouts: Rollouts, metrics: dict[str, float] | None) -> GamePairs:
        """The judged pairs of one policy's samples and their Δ (``estimate``)."""
        if self.section.estimate == "pair":
            judged = judge_pairs(self.labeller, rollouts, adjacent_pairs(rollouts), metrics)
            pairs = [ab for ab, _ in judged]
            margins = [self.preference(v) - 0.5 for _, v in judged]
        else:
            win = round_robin(self.labeller, rollouts, by_prompt(rollouts),
                              self.section.preference, metrics)
            pairs = [(a, b) for a, b in adjacent_pairs(rollouts)
                     if rollouts.completions[a] != rollouts.completions[b]]
            margins = [win[a] - win[b] for a, b in pairs]
        ref = self.start_logps(rollouts, range(len(rollouts.completions)))
        return GamePairs(pairs, margins, ref)

    def units(self, rollouts: Rollouts, game: GamePairs) -> Units:
        return self.scorer.units(pair_examples(rollouts, game.pairs, self.eos),
                                 ref_logps=of_pairs(game.ref_logps, game.pairs),
                                 win_margin=torch.tensor(game.win_margin))

    def judge(self, rows: list[dict[str, Any]], rollouts: Rollouts,
              metrics: dict[str, float]) -> GamePairs:
        game = self.game(rollouts, metrics)
        self.monitor(rows, rollouts, metrics, game.ref_logps)
        return game

    trains_in_make_batches = True  # the extrapolation step (controller.OnlineAlgorithm)

    def make_batches(self, rows: list[dict[str, Any]], rollouts: Rollouts, judged: GamePairs,
                     metrics: dict[str, float]) -> Units | None:
        metrics["pairs"] = len(judged.pairs)
        # with N processes every rank steps, or none: a rank without pairs of its own takes part
        if not int(distributed.global_sum([len(judged.pairs)])[0]):
            return None
        # a, b. the extrapolation step from θ_t, on the game at π_t (every rank takes part,
        # with or without pairs of its own: the learner's update is collective)
        theta_t = self.learner.snapshot()  # this rank's shards/partition under sharding
        half = self.learner.update(self.units(rollouts, judged) if judged.pairs else NO_UNITS)
        metrics.update({f"extrapolation/{k}": v for k, v in half.items() if k != "lr"})
        # c. the game at π_{t+1/2}: its samples on the same prompts, judged (under FSDP2 with
        # the weights gathered: ranks sample different numbers of forwards)
        n = len(rollouts.completions) // max(len(rows), 1)
        with gathered(self.learner, self):
            self.parts.rollout.sync_weights()  # a sampler with its own weights (Ray) takes θ_{t+1/2}
            extrapolated = self.parts.rollout.generate(
                [r["prompt"] for r in rows], n,
                seed=self.seed * 7919 + self.iteration + EXTRAPOLATED_SAMPLES)
            counts: dict[str, float] = {}
            game = self.game(extrapolated, counts)
        for key in ("labels", "ties", "dropped_identical", "skipped"):
            if key in counts:
                metrics[key] = metrics.get(key, 0) + counts[key]
        metrics["labels_total"] = counts["labels_total"]
        metrics["extrapolated_pairs"] = len(game.pairs)
        if self.parts.start.gold is not None:
            metrics["extrapolated_gold_mean"] = statistics.fmean(
                self.parts.start.gold(extrapolated.prompts, extrapolated.completions))
        # d. back to θ_t; the controller's update steps from there on π_{t+1/2}'s game
        self.learner.restore(theta_t)
        return self.units(extrapolated, game) if game.pairs else None


def train_egpo(cfg: EGPOConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` EGPO iterations and save the final policy."""
    section = cfg.egpo
    parts = build_parts(cfg, section, min_n=2, name="egpo")
    learner = Learner(parts.model, EGPOObjective(section.kl_coef), cfg.train, seed=cfg.train.seed)
    return run(parts, learner, EGPO(parts, learner, section, seed=cfg.train.seed), cfg, "egpo")


ALGORITHMS.register("egpo")(AlgorithmEntry(
    EGPOConfig, train_egpo,
    "EGPO: extragradient on the KL-regularised preference game — an online IPO step to "
    "θ_{t+1/2}, then the step from θ_t driven by π_{t+1/2}'s judged samples (Zhou et al. 2025)."))
