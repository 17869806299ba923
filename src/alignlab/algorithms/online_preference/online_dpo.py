"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"):
every step the *current* policy samples two or more completions per prompt, a judge picks the
chosen and the rejected one, and a paired preference loss updates the policy against the
initial policy as reference.

On the online controller (``engine/controller.py``):

1. the rollout role samples ``rollout.n`` ≥ 2 completions per prompt from π_θ;
2. ``judge``: ``rewards.judges.judge_pairs`` pairs them (0, 1), (2, 3), … and a pairwise judge
   orders each pair (``judge_config.py``): a pointwise reward by Bradley-Terry (``judge.kind:
   reward`` — the world's gold, a trained reward model or ensemble, any registered reward), a
   simulated annotator (``annotator``: noisy, length-biased), a pool of biased annotators
   (``pool``, AlpacaFarm), an LLM judge (``llm``) or a trained pairwise preference model
   (``preference_model``); within the labelling budget (``judge.max_labels``); ties,
   identical pairs and pairs past the budget are dropped;
3. ``make_batches``: each pair becomes a preference example (prompt ids, chosen and rejected
   ids with the eos that ended them) with log π_ref of both (the frozen initial policy's
   log-probs of every sample, computed once in ``judge``); the units are pairs, collated by
   the preference family's ``collate_groups``;
4. the learner minimises any registered *paired* preference loss (``online_dpo.loss``, with
   the preference trainer's objective: DPO's sigmoid, IPO, hinge, …).

The reference is the starting model of ``common.py``: its log-probs of the policy's samples
give ``kl_ref`` and, for the judged pairs, log π_ref of chosen and rejected; every
``win_rate_every`` iterations the policy's samples are compared with the starting model's on
the same prompts (``win_rate_judge`` by a separate judge of the same config, ``win_rate_gold``).
Pairs are ordered by the judge's choice, so ``online_dpo.preference`` (probability or label)
changes nothing here.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import ClassVar

import torch

from alignlab.algorithms.online_preference.common import (
    MonitorFields,
    OnlinePreference,
    build_parts,
    by_prompt,
    plan_paired_loss,
    run,
    sample_ids,
)
from alignlab.algorithms.online_preference.judge_config import JudgeSection
from alignlab.algorithms.preference.trainer import PreferenceObjective, PreferenceSection
from alignlab.algorithms.registry import ALGORITHMS, AlgorithmEntry
from alignlab.core.config import (
    ModelSection,
    OnlineTrainSection,
    RolloutSection,
    Section,
    WorldSection,
)
from alignlab.engine.controller import OnlineRun, Rows
from alignlab.engine.learner import Learner, Units
from alignlab.rewards.judges import BudgetedJudge
from alignlab.rollout.role import Rollouts


class OnlineDPOSection(PreferenceSection, MonitorFields):
    """The preference trainer's loss fields (``loss``, ``beta``, ``loss_kwargs``), the judge and
    the win-rate schedule."""

    loss: str = "sigmoid"
    judge: JudgeSection = JudgeSection()


class OnlineDPOConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)

    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/online_dpo", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=2)
    online_dpo: OnlineDPOSection = OnlineDPOSection()


@dataclass
class JudgedPairs:
    """The iteration's ordered pairs as (chosen, rejected) sample indices, and log π_ref of
    every sample."""

    pairs: list[tuple[int, int]]
    ref_logps: torch.Tensor


class OnlineDPO(OnlinePreference):
    def judge(self, rows: Rows, rollouts: Rollouts, metrics: dict[str, float]) -> JudgedPairs:
        ref_logps = self.start_logps(rollouts, range(len(rollouts.completions)))
        self.monitor(rows, rollouts, metrics, ref_logps)
        cand = [(g[j], g[j + 1]) for g in by_prompt(rollouts) for j in range(0, len(g) - 1, 2)]
        verdicts = self.labeller.verdicts([rollouts.prompts[a] for a, _ in cand],
                                          [rollouts.completions[a] for a, _ in cand],
                                          [rollouts.completions[b] for _, b in cand], metrics)
        pairs, p_chosen = [], []
        for (a, b), v in zip(cand, verdicts):
            if v is not None and v.a_preferred is not None:
                pairs.append((a, b) if v.a_preferred else (b, a))
                p_chosen.append(v.p_a if v.a_preferred else 1 - v.p_a)
        # The labeller logged labels (pairs + ties), ties (judged, not identical),
        # labels_total, dropped_identical, and skipped when a budget refused some.
        metrics.update({"pairs": len(pairs), "skipped": metrics.get("skipped", 0),
                        "judge_p_chosen_mean": statistics.fmean(p_chosen) if p_chosen
                        else float("nan")})
        judge = self.labeller.judge
        if isinstance(judge, BudgetedJudge):  # new labels paid for, cumulative
            metrics.update({"labels_used": judge.labels_used,
                            "judge_cache_hits": judge.cache_hits})
        return JudgedPairs(pairs, ref_logps)

    def make_batches(self, rows: Rows, rollouts: Rollouts, judged: JudgedPairs,
                     metrics: dict[str, float]) -> Units | None:
        if not judged.pairs:
            return None
        ref = judged.ref_logps
        examples = [{"prompt_ids": list(rollouts.prompt_ids[c]),
                     "chosen_ids": sample_ids(rollouts, c, self.eos),
                     "rejected_ids": sample_ids(rollouts, r, self.eos),
                     "ref_logps": [float(ref[c]), float(ref[r])]} for c, r in judged.pairs]
        metrics["chosen_length"] = statistics.fmean(len(e["chosen_ids"]) for e in examples)
        metrics["rejected_length"] = statistics.fmean(len(e["rejected_ids"]) for e in examples)
        return self.scorer.units(examples)

    def progress_info(self, metrics: dict[str, float]) -> str:
        w = metrics.get("win_rate_gold")
        return f"pairs {int(metrics.get('pairs', 0))}" + (f" win {w:.2f}" if w is not None else "")


def train_online_dpo(cfg: OnlineDPOConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` online DPO iterations and save the final policy."""
    section = cfg.online_dpo
    plan = plan_paired_loss(section, "online_dpo")
    parts = build_parts(cfg, section, min_n=2, name="online_dpo")
    learner = Learner(parts.model, PreferenceObjective(plan), cfg.train, seed=cfg.train.seed)
    return run(parts, learner, OnlineDPO(parts, learner, section), cfg, "online_dpo")


ALGORITHMS.register("online_dpo")(AlgorithmEntry(
    OnlineDPOConfig, train_online_dpo,
    "Online DPO: the current policy samples pairs, a judge labels them, any paired "
    "preference loss learns from them against the initial policy."))
