"""XPO (Xie et al. 2024, "Exploratory Preference Optimization: Harnessing Implicit
Q*-Approximation for Sample-Efficient RLHF"): online DPO on pairs of one policy sample and one
reference sample, plus an exploration term α·log π_θ(ỹ) on the reference samples ỹ.

Per iteration (Algorithm 1 of the paper):

1. the policy samples ``rollout.n`` completions y per prompt; ``judge`` draws as many ỹ ~ π_ref
   (the initial policy) on the same prompts;
2. the judge orders each (y_j, ỹ_j) into (y⁺, y⁻); ties and identical pairs are dropped;
3. the learner minimises  ℓ(β·h) + α·log π_θ(ỹ)  per pair, ℓ any registered paired loss on
   sequence log-probs (DPO's −log σ by default), ``losses.online_preference.xpo_exploration``
   the second term. Its sign is the paper's and TRL's ``XPOTrainer``'s (``dpo + α·logπ(ỹ)``,
   minimised): the policy is pushed off what π_ref would say, i.e. to explore.

Deviations: the paper's update is the argmin over all pairs gathered so far; here, as in TRL,
one update per iteration on that iteration's pairs. Ties carry no label for the DPO part and are
dropped with their exploration term (the paper's judge always labels).

The reference samples double as the win-rate opponents: ``win_rate_judge`` comes from the
training verdicts (no extra labels), ``win_rate_gold`` from the gold reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field

from alignlab.algorithms.online_preference.common import (
    MonitorFields,
    OnlinePreference,
    batch_tensors,
    build_parts,
    plan_paired_loss,
    run,
    sample_ids,
)
from alignlab.algorithms.preference.trainer import LossPlan, PreferenceObjective, PreferenceSection
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
from alignlab.losses.online_preference import xpo_exploration
from alignlab.rewards.judges import Verdict
from alignlab.rollout.role import Rollouts


class XPOSection(PreferenceSection, MonitorFields):
    """The preference trainer's loss fields (``loss``, ``beta``, ``loss_kwargs``), the judge
    and the exploration coefficient α."""

    loss: str = "sigmoid"
    alpha: float = Field(1e-5, ge=0)
    """α of the exploration term α·log π_θ(ỹ) (TRL's default; 0 is online DPO on
    policy-vs-reference pairs)."""


class XPOConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)

    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/xpo", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=2)
    xpo: XPOSection = XPOSection()


class XPOObjective(PreferenceObjective):
    """The preference objective on (y⁺, y⁻) plus α·log π_θ(ỹ): the batch's ``explore_slot``
    says which of a pair's two completions is the reference sample."""

    def __init__(self, plan: LossPlan, alpha: float) -> None:
        super().__init__(plan)
        self.alpha = alpha
        self._logps: torch.Tensor | None = None

    def inputs(self, logps: torch.Tensor, ref: torch.Tensor | None, batch: dict[str, Any],
               token_logps: torch.Tensor | None = None) -> Any:
        self._logps = logps  # the one forward's log-probs, reused by the exploration term
        return super().inputs(logps, ref, batch, token_logps)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        out = super().loss(model, batch)
        logps, b = self._logps, int(batch["num_groups"])
        self._logps = None
        (slot,) = batch_tensors(batch, logps.device, "explore_slot")
        explored = torch.where(slot == 0, logps[:b], logps[b:])
        term = xpo_exploration(explored, alpha=self.alpha)
        out.metrics.update({"loss/xpo": float(term.detach().mean()),
                            "logps/reference_samples": float(explored.detach().mean())})
        return LossOutput(out.loss_sum + term.sum(), out.metrics)


@dataclass
class XPOPairs:
    """(policy sample, reference sample, verdict) per pair; log π_ref of both samples."""

    reference_samples: Rollouts
    verdicts: list[Verdict | None]
    ref_policy: torch.Tensor
    ref_reference: torch.Tensor


class XPO(OnlinePreference):
    def judge(self, rows: list[dict[str, Any]], rollouts: Rollouts,
              metrics: dict[str, float]) -> XPOPairs:
        n = len(rollouts.completions) // len(rows)
        theirs = self.start.samples([r["prompt"] for r in rows], n, self.iteration)
        verdicts = self.labeller.verdicts(rollouts.prompts, rollouts.completions,
                                          theirs.completions, metrics)
        everything = range(len(rollouts.completions))
        ref_policy = self.start_logps(rollouts, everything)
        self.start.kl(rollouts, ref_policy, metrics)
        self.start.win_rates(rollouts.prompts, rollouts.completions, theirs.completions, metrics,
                             verdicts=verdicts)
        return XPOPairs(theirs, verdicts, ref_policy, self.start_logps(theirs, everything))

    def make_batches(self, rows: list[dict[str, Any]], rollouts: Rollouts, judged: XPOPairs,
                     metrics: dict[str, float]) -> Units | None:
        examples, explore = [], []
        for j, v in enumerate(judged.verdicts):
            if v is None or v.a_preferred is None:
                continue
            mine = (sample_ids(rollouts, j, self.eos), float(judged.ref_policy[j]))
            theirs = (sample_ids(judged.reference_samples, j, self.eos),
                      float(judged.ref_reference[j]))
            (chosen, c_ref), (rejected, r_ref) = (mine, theirs) if v.a_preferred else (theirs, mine)
            examples.append({"prompt_ids": list(rollouts.prompt_ids[j]), "chosen_ids": chosen,
                             "rejected_ids": rejected, "ref_logps": [c_ref, r_ref]})
            explore.append(1 if v.a_preferred else 0)
        metrics["pairs"] = len(examples)
        if not examples:
            return None
        metrics["policy_chosen_rate"] = sum(explore) / len(explore)
        return self.scorer.units(examples, explore_slot=torch.tensor(explore))


def train_xpo(cfg: XPOConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` XPO iterations and save the final policy."""
    section = cfg.xpo
    plan = plan_paired_loss(section, "xpo")
    parts = build_parts(cfg, section, min_n=1, name="xpo")
    learner = Learner(parts.model, XPOObjective(plan, section.alpha), cfg.train,
                      seed=cfg.train.seed)
    return run(parts, learner, XPO(parts, learner, section), cfg, "xpo")


ALGORITHMS.register("xpo")(AlgorithmEntry(
    XPOConfig, train_xpo,
    "XPO: online DPO on policy-vs-reference pairs plus the exploration term α·log π(ỹ) on the "
    "reference samples (Xie et al. 2024)."))
