"""Nash-MD (Munos et al. 2023, "Nash Learning from Human Feedback"), in the policy-gradient form
of the paper's experiments (Nash-MD-PG): the policy plays against the geometric mixture of itself
and the reference, and moves towards what a pairwise preference prefers.

Per iteration:

1. the policy samples ``rollout.n`` completions y per prompt; ``judge`` samples as many y′ from
   the opponent π^β_θ ∝ π_θ^(1−β)·π_ref^β — token by token, as in the paper's experiments and
   TRL's ``GeometricMixtureWrapper`` (``losses.online_preference.geometric_mixture``; the
   reference runs beside the policy in the rollout engine with its own KV cache);
2. the judge gives P(y_j ≻ y′_j) (its probability, or its label with ``preference: label``);
   identical pairs are P = ½, pairs it leaves unlabelled are dropped;
3. one policy-gradient step on −(P − ½)·log π_θ(y) + τ·sg[log π_θ(y)/π_ref(y)]·log π_θ(y)
   (``losses.online_preference.nash_md_pg``): the preference signal with ½ as baseline, and
   the REINFORCE gradient of τ·KL(π_θ‖π_ref).

The reference π_ref is the initial policy. β is TRL's ``mixture_coef``, τ its ``beta``.
Deviation from TRL: the KL's score-function weight is the sequence log-ratio (the paper's
gradient of the sequence KL), where TRL weights each token by its own log-ratio.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field

from alignlab.algorithms.online_preference.common import (
    MIXTURE_SAMPLES,
    MonitorFields,
    OnlinePreference,
    Parts,
    SampleObjective,
    batch_tensors,
    build_parts,
    check_on_policy,
    run,
    sample_ids,
)
from alignlab.algorithms.policy_gradient.nlpo import TopPMaskProcessor
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
from alignlab.losses.online_preference import geometric_mixture, nash_md_pg
from alignlab.models.logprobs import completion_logprobs
from alignlab.rewards.judges import Verdict
from alignlab.rollout.role import RolloutRole, Rollouts


class NashMDSection(MonitorFields):
    """The judge, the opponent's mixture coefficient β and the KL coefficient τ."""

    mixture_coef: float = Field(0.5, ge=0, le=1)
    """β of the opponent π_θ^(1−β)·π_ref^β (0: the policy itself, 1: the reference)."""
    kl_coef: float = Field(0.1, ge=0)
    """τ of the KL(π_θ‖π_ref) regulariser."""


class NashMDConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)

    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/nash_md", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=2)
    nash_md: NashMDSection = NashMDSection()


class GeometricMixtureProcessor(TopPMaskProcessor):
    """The rollout engine's ``LogitsProcessor`` that samples from π^β: NLPO's side-model walk
    (π_ref runs beside the policy on the same rows with its own KV cache), with the geometric
    mixture of the two next-token distributions instead of a top-p mask."""

    def __init__(self, reference: torch.nn.Module, mixture_coef: float) -> None:
        super().__init__(reference, top_p=1.0)
        self.mixture_coef = mixture_coef

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return geometric_mixture(logits, self.logits, mixture_coef=self.mixture_coef)


class NashMDObjective(SampleObjective):
    """Σ of ``nash_md_pg`` over a micro-batch of the policy's samples; ``num_items`` = samples."""

    def __init__(self, kl_coef: float) -> None:
        self.kl_coef = kl_coef

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        logps = completion_logprobs(model, batch)
        ref, preference = batch_tensors(batch, logps.device, "ref_logps", "preference")
        losses = nash_md_pg(logps, ref, preference, kl_coef=self.kl_coef)
        metrics = {"loss/score": float(((preference - 0.5) * logps).detach().mean()),
                   "loss/kl": float((logps - ref).detach().mean())}
        return LossOutput(losses.sum(), metrics)


@dataclass
class NashPairs:
    verdicts: list[Verdict | None]
    ref_logps: torch.Tensor


class NashMD(OnlinePreference):
    def __init__(self, parts: Parts, learner: Learner, section: NashMDSection, *,
                 mixture: RolloutRole, seed: int) -> None:
        super().__init__(parts, learner, section)
        self.mixture, self.seed = mixture, seed

    def judge(self, rows: list[dict[str, Any]], rollouts: Rollouts,
              metrics: dict[str, float]) -> NashPairs:
        n = len(rollouts.completions) // len(rows)
        self.mixture.prompt_offset = self.parts.rollout.prompt_offset  # this rank's prompts
        opponents = self.mixture.generate([r["prompt"] for r in rows], n,
                                          seed=self.seed * 7919 + self.iteration + MIXTURE_SAMPLES)
        verdicts = self.labeller.verdicts(rollouts.prompts, rollouts.completions,
                                          opponents.completions, metrics)
        ref = self.start_logps(rollouts, range(len(rollouts.completions)))
        self.monitor(rows, rollouts, metrics, ref)
        scored = [self.preference(v) for v in verdicts if v is not None]
        if scored:
            metrics["preference_vs_mixture"] = statistics.fmean(scored)
        return NashPairs(verdicts, ref)

    def make_batches(self, rows: list[dict[str, Any]], rollouts: Rollouts, judged: NashPairs,
                     metrics: dict[str, float]) -> Units | None:
        keep = [j for j, v in enumerate(judged.verdicts) if v is not None]
        metrics["samples"] = len(keep)
        if not keep:
            return None
        examples = [{"prompt_ids": list(rollouts.prompt_ids[j]),
                     "completion_ids": sample_ids(rollouts, j, self.eos),
                     "ref_logps": [float(judged.ref_logps[j])]} for j in keep]
        preference = torch.tensor([self.preference(judged.verdicts[j]) for j in keep])
        return self.scorer.units(examples, preference=preference)


def train_nash_md(cfg: NashMDConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` Nash-MD iterations and save the final policy."""
    section = cfg.nash_md
    check_on_policy(cfg.rollout, "nash_md")
    parts = build_parts(cfg, section, min_n=1, name="nash_md")
    reference = parts.start.model
    mixture = parts.extra["role"](parts.model, logits_processor=lambda: GeometricMixtureProcessor(
        reference, section.mixture_coef))
    learner = Learner(parts.model, NashMDObjective(section.kl_coef), cfg.train,
                      seed=cfg.train.seed)
    algorithm = NashMD(parts, learner, section, mixture=mixture, seed=cfg.train.seed)
    return run(parts, learner, algorithm, cfg, "nash_md")


ALGORITHMS.register("nash_md")(AlgorithmEntry(
    NashMDConfig, train_nash_md,
    "Nash-MD: policy gradient on P(y ≻ y') against samples of the geometric mixture of policy "
    "and reference, with a KL to the reference (Munos et al. 2023)."))
