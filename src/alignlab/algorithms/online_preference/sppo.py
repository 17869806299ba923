"""SPPO (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment"): the
policy plays against itself; each sample's log-likelihood ratio to the policy that drew it is
regressed onto η·(its estimated win probability − ½).

One controller iteration is one SPPO iteration t (Algorithm 1 of the paper):

1. π_t (the policy now) samples K = ``rollout.n`` completions per prompt;
2. ``judge``: every pair of a prompt's samples is judged once (K(K−1)/2 labels per prompt) and
   P̂(y ≻ π_t | x) = (1/K)·Σ_k P(y ≻ y_k | x), y_k the prompt's samples, y itself included
   (P = ½); pairs the judge leaves unlabelled are left out of the mean;
3. ``make_batches``: log π_t(y) from one no-grad pass of the policy before the update;
   ``train_on: all`` keeps every sample (the paper's Algorithm 1), ``best_worst`` only each
   prompt's highest and lowest P̂ (its released recipe);
4. the learner minimises (log π_θ(y) − log π_t(y) − η·(P̂ − ½))²
   (``losses.online_preference.sppo_square``) for ``epochs`` passes, π_t frozen meanwhile.

The paper fine-tunes each iteration to convergence on a fixed prompt set; here an iteration
is one rollout batch and ``epochs`` passes over it.
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
    RoundSchedule,
    SampleObjective,
    batch_tensors,
    build_parts,
    by_prompt,
    round_robin,
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
from alignlab.losses.online_preference import sppo_square
from alignlab.models.logprobs import completion_logprobs
from alignlab.rollout.role import Rollouts


class SPPOSection(MonitorFields, RoundSchedule):
    """The judge, η and the round's training schedule (``epochs`` passes over the iteration's
    samples, π_t staying the sampling policy)."""

    eta: float = Field(1.0, gt=0)
    """η: the log-ratio target of a sample is η·(P̂ − ½)."""
    train_on: Literal["all", "best_worst"] = "all"


class SPPOConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)

    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/sppo", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=4)
    sppo: SPPOSection = SPPOSection()


class SPPOObjective(SampleObjective):
    """Σ of ``sppo_square`` over a micro-batch of samples; ``num_items`` = samples."""

    def __init__(self, eta: float) -> None:
        self.eta = eta

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        logps = completion_logprobs(model, batch)
        old, win = batch_tensors(batch, logps.device, "old_logps", "win_prob")
        losses = sppo_square(logps, old, win, eta=self.eta)
        return LossOutput(losses.sum(), {"log_ratio": float((logps - old).detach().mean()),
                                         "target_abs": float((self.eta * (win - 0.5)).abs().mean())})


@dataclass
class WinProbabilities:
    win_prob: list[float]


class SPPO(OnlinePreference):
    def judge(self, rows: list[dict[str, Any]], rollouts: Rollouts,
              metrics: dict[str, float]) -> WinProbabilities:
        win = round_robin(self.labeller, rollouts, by_prompt(rollouts), self.section.preference,
                          metrics)
        self.monitor(rows, rollouts, metrics,
                     self.start_logps(rollouts, range(len(rollouts.completions))))
        metrics["win_prob_spread"] = statistics.fmean(
            max(win[i] for i in g) - min(win[i] for i in g) for g in by_prompt(rollouts))
        return WinProbabilities(win)

    def make_batches(self, rows: list[dict[str, Any]], rollouts: Rollouts,
                     judged: WinProbabilities, metrics: dict[str, float]) -> Units | None:
        win = judged.win_prob
        if self.section.train_on == "all":
            keep = list(range(len(win)))
        else:
            keep = []
            for g in by_prompt(rollouts):
                best, worst = max(g, key=win.__getitem__), min(g, key=win.__getitem__)
                if win[best] > win[worst]:
                    keep += [best, worst]
        metrics["samples"] = len(keep)
        if not keep:
            return None
        old = self.policy_logps(rollouts, keep)
        examples = [{"prompt_ids": list(rollouts.prompt_ids[i]),
                     "completion_ids": sample_ids(rollouts, i, self.eos)} for i in keep]
        return self.scorer.units(examples, old_logps=old,
                                 win_prob=torch.tensor([win[i] for i in keep]))


def train_sppo(cfg: SPPOConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` SPPO iterations and save the final policy."""
    section = cfg.sppo
    parts = build_parts(cfg, section, min_n=2, name="sppo")
    learner = Learner(parts.model, SPPOObjective(section.eta), cfg.train, epochs=section.epochs,
                      minibatch_size=section.minibatch_size, seed=cfg.train.seed)
    return run(parts, learner, SPPO(parts, learner, section), cfg, "sppo")


ALGORITHMS.register("sppo")(AlgorithmEntry(
    SPPOConfig, train_sppo,
    "SPPO: self-play; each sample's log-ratio to the sampling policy regressed onto "
    "η·(P̂(y ≻ π_t) − ½), P̂ from judging the prompt's samples against each other "
    "(Wu et al. 2024)."))
