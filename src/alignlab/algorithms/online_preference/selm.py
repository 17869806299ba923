"""SELM (Zhang et al. 2024, "Self-Exploring Language Models: Active Preference Elicitation for
Online Alignment"): iterative DPO whose reference is the last iteration's policy, plus an
optimism term that lowers the policy's log-likelihood of the reference's own samples.

One controller iteration is one iteration t of the paper's Algorithm 1:

1. π_ref = π_θ(t−1), the policy as the iteration starts, samples ``rollout.n`` completions y per
   prompt (the policy samples them: it *is* π_ref until the update);
2. ``judge``: the samples are paired (0, 1), (2, 3), … and each pair is ordered by the judge
   into (y⁺, y⁻); ties and pairs left unlabelled are dropped;
3. ``make_batches``: log π_ref of both from one no-grad pass of the policy before the update;
4. the learner minimises, for ``epochs`` passes,  ℓ(β·h) + α·β·½·Σ_{y ∈ pair} log π_θ(y)/π_ref(y)
   — ℓ any registered paired loss (DPO's −log σ by default), the second term
   ``losses.online_preference.selm_optimism`` on the pair's two samples of π_ref (the paper's
   −α·E_{y~π_ref}[log π_θ(y)], maximised; its sign and the α·β scaling are the authors' code);
5. the next iteration's π_ref is the updated policy (Algorithm 1: "let π_ref = π_θt").

Deviations: the paper's D_t re-ranks one new sample with the previous iteration's (chosen,
rejected) of a fixed prompt set and trains to convergence; here each iteration samples fresh
prompts, ranks the pairs of its own samples and runs ``epochs`` passes. The optimism term's
samples are the labelled pairs' (an unbiased draw of π_ref only over the pairs the judge
ordered).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from pydantic import Field

from alignlab.algorithms.online_preference.common import (
    MonitorFields,
    OnlinePreference,
    RoundSchedule,
    adjacent_pairs,
    build_parts,
    plan_paired_loss,
    run,
    sample_ids,
)
from alignlab.algorithms.online_preference.value_term import ValueTermObjective
from alignlab.algorithms.preference.trainer import PreferenceSection
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
from alignlab.losses.online_preference import selm_optimism
from alignlab.rollout.role import Rollouts


class SELMSection(PreferenceSection, MonitorFields, RoundSchedule):
    """The preference trainer's loss fields (``loss``, ``beta``, ``loss_kwargs``), the judge,
    the optimism coefficient α and the iteration's training schedule (its units are pairs)."""

    loss: str = "sigmoid"
    beta: float = Field(0.1, gt=0)
    """β of the paired loss and of the optimism term α·β·log π_θ(y)/π_ref(y)."""
    alpha: float = Field(1e-3, ge=0)
    """α of the optimism term (the authors' recipes: 1e-3 and 1e-4 with β = 0.01; 0 is
    iterative DPO with the reference refreshed every iteration)."""


class SELMConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)

    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/selm", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=2)
    selm: SELMSection = SELMSection()


@dataclass
class OrderedPairs:
    pairs: list[tuple[int, int]]
    """(chosen, rejected) sample indices"""


class SELM(OnlinePreference):
    def judge(self, rows: list[dict[str, Any]], rollouts: Rollouts,
              metrics: dict[str, float]) -> OrderedPairs:
        self.monitor(rows, rollouts, metrics,
                     self.start_logps(rollouts, range(len(rollouts.completions))))
        return OrderedPairs(adjacent_pairs(self.labeller, rollouts, metrics))

    def make_batches(self, rows: list[dict[str, Any]], rollouts: Rollouts, judged: OrderedPairs,
                     metrics: dict[str, float]) -> Units | None:
        metrics["pairs"] = len(judged.pairs)
        if not judged.pairs:
            return None
        chosen, rejected = [c for c, _ in judged.pairs], [r for _, r in judged.pairs]
        ref = self.policy_logps(rollouts, chosen + rejected)  # π_ref = the policy right now
        b = len(chosen)
        examples = [{"prompt_ids": list(rollouts.prompt_ids[c]),
                     "chosen_ids": sample_ids(rollouts, c, self.eos),
                     "rejected_ids": sample_ids(rollouts, r, self.eos),
                     "ref_logps": [float(ref[j]), float(ref[b + j])]}
                    for j, (c, r) in enumerate(judged.pairs)]
        return self.scorer.units(examples)


def train_selm(cfg: SELMConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` SELM iterations and save the final policy."""
    section = cfg.selm
    plan = plan_paired_loss(section, "selm")
    parts = build_parts(cfg, section, min_n=2, name="selm")
    objective = ValueTermObjective(
        plan, partial(selm_optimism, alpha=section.alpha, beta=section.beta), "selm_optimism")
    learner = Learner(parts.model, objective, cfg.train, epochs=section.epochs,
                      minibatch_size=section.minibatch_size, seed=cfg.train.seed)
    return run(parts, learner, SELM(parts, learner, section), cfg, "selm")


ALGORITHMS.register("selm")(AlgorithmEntry(
    SELMConfig, train_selm,
    "SELM: iterative DPO against the last iteration's policy plus the optimism term "
    "α·β·log π(y)/π_ref(y) on the reference's samples (Zhang et al. 2024)."))
