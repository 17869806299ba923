"""Iterative DPO (Dong et al. 2024, "RLHF Workflow: From Reward Modeling to Online RLHF"):
rounds of generate → judge → train several epochs on that round's pairs, with the reference
optionally refreshed every round (Gorbatovski et al. 2024, "Learn Your Reference Model for Real
Good Alignment", TR-DPO) and offline preference pairs mixed in at a stated ratio.

One controller iteration is one round:

1. the policy samples ``rollout.n`` completions for each of the round's prompts;
2. ``judge``: pairs from each prompt's samples — ``adjacent`` (0, 1), (2, 3), … one label each,
   or ``best_worst`` (RLHF Workflow's recipe: the sample that wins most against its siblings as
   chosen, the one that wins least as rejected; every pair of siblings is judged, n(n−1)/2
   labels per prompt); ties and unlabelled pairs are dropped;
3. ``make_batches``: the round's online pairs plus offline pairs (``offline_data``, drawn per
   round from the seed, so a resume draws the same), ``offline_ratio`` of the round's pairs:
   k = round(online · r / (1 − r)); log π_ref of all of them from the current reference;
4. the learner runs ``epochs`` passes of minibatches over them with any registered paired loss;
5. ``after_update``: every ``refresh_every`` rounds the reference is refreshed — ``hard``:
   π_ref ← π_θ; ``soft`` (TR-DPO): π_ref ← α·π_θ + (1 − α)·π_ref, parameter by parameter.

Deviation from RLHF Workflow: its pairs are ranked by a pointwise reward model; here any
pairwise judge ranks them (``best_worst``: by the mean P(y ≻ sibling), a Copeland-style
score), so annotators and LLM judges fit too.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from alignlab.algorithms.online_preference.common import (
    MonitorFields,
    OnlinePreference,
    Parts,
    RoundSchedule,
    adjacent_pairs,
    build_parts,
    by_prompt,
    plan_paired_loss,
    round_robin,
    run,
    sample_ids,
)
from alignlab.algorithms.preference.reference import compute_reference_logps
from alignlab.algorithms.preference.trainer import (
    PreferenceObjective,
    PreferenceSection,
    load_preference_examples,
)
from alignlab.algorithms.registry import ALGORITHMS, AlgorithmEntry
from alignlab.core.config import (
    DataSection,
    ModelSection,
    OnlineTrainSection,
    RolloutSection,
    Section,
    WorldSection,
)
from alignlab.core.errors import ConfigError
from alignlab.engine import distributed, sharding
from alignlab.engine.controller import OnlineRun
from alignlab.engine.learner import Learner, Units
from alignlab.models.adapters import adapter_state_dict, frozen_copy, load_adapter_state_dict
from alignlab.rollout.role import Rollouts


def named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers, each shared tensor once."""
    return [*model.named_parameters(), *model.named_buffers()]


class IterativeDPOSection(PreferenceSection, MonitorFields, RoundSchedule):
    """The preference trainer's loss fields (``loss``, ``beta``, ``loss_kwargs``), the judge,
    the round's training schedule (its units are pairs), the reference refresh and the offline
    mix."""

    loss: str = "sigmoid"
    pairs: Literal["adjacent", "best_worst"] = "adjacent"
    reference_refresh: Literal["none", "hard", "soft"] = "none"
    refresh_alpha: float = Field(0.5, gt=0, le=1)
    """α of the soft refresh π_ref ← α·π_θ + (1 − α)·π_ref (TR-DPO)."""
    refresh_every: int = Field(1, gt=0)
    """Rounds between refreshes."""
    offline_data: str | None = None
    """Offline preference pairs: a file or folder of ``preference`` rows, a Hub name, or
    ``world:<task>`` (the world's oracle pairs)."""
    offline_ratio: float = Field(0.0, ge=0, lt=1)
    """The share of offline pairs among each round's training pairs."""
    offline_limit: int = Field(2048, gt=0)
    """Rows read from ``offline_data``."""

    @model_validator(mode="after")
    def _check_offline(self) -> "IterativeDPOSection":
        if (self.offline_data is None) != (self.offline_ratio == 0):
            raise ValueError("iterative_dpo.offline_ratio and iterative_dpo.offline_data go "
                             "together: set both (ratio in (0, 1)) or neither")
        return self


class IterativeDPOConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)

    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/iterative_dpo", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=4)
    iterative_dpo: IterativeDPOSection = IterativeDPOSection()


@dataclass
class RoundPairs:
    """The round's judged pairs as (chosen, rejected) sample indices."""

    pairs: list[tuple[int, int]]


class IterativeDPO(OnlinePreference):
    def __init__(self, parts: Parts, learner: Learner, section: IterativeDPOSection, *,
                 reference: torch.nn.Module, offline: list[dict[str, Any]], seed: int) -> None:
        super().__init__(parts, learner, section)
        self.reference, self.offline, self.seed = reference, offline, seed
        self.refreshes = 0

    def judge(self, rows: list[dict[str, Any]], rollouts: Rollouts,
              metrics: dict[str, float]) -> RoundPairs:
        self.monitor(rows, rollouts, metrics, self.start_logps(rollouts, range(len(rollouts.completions))))
        groups = by_prompt(rollouts)
        pairs: list[tuple[int, int]] = []
        if self.section.pairs == "adjacent":
            pairs = adjacent_pairs(self.labeller, rollouts, metrics)
        else:
            wins = round_robin(self.labeller, rollouts, groups, self.section.preference, metrics)
            for g in groups:
                best, worst = max(g, key=wins.__getitem__), min(g, key=wins.__getitem__)
                if wins[best] > wins[worst]:
                    pairs.append((best, worst))
        return RoundPairs(pairs)

    def make_batches(self, rows: list[dict[str, Any]], rollouts: Rollouts, judged: RoundPairs,
                     metrics: dict[str, float]) -> Units | None:
        examples = [{"prompt_ids": list(rollouts.prompt_ids[c]),
                     "chosen_ids": sample_ids(rollouts, c, self.eos),
                     "rejected_ids": sample_ids(rollouts, r, self.eos)} for c, r in judged.pairs]
        metrics["online_pairs"] = len(examples)
        r = self.section.offline_ratio
        k = round(len(examples) * r / (1 - r)) if self.offline else 0
        if k:
            seed = self.seed * 1_000_033 + self.iteration
            rank = distributed.rank()  # each process mixes in its own offline pairs
            rng = random.Random(seed if rank == 0 else f"{seed}:{rank}")
            picks = (rng.sample(range(len(self.offline)), k) if k <= len(self.offline)
                     else rng.choices(range(len(self.offline)), k=k))
            examples += [{key: self.offline[i][key]
                          for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in picks]
        metrics["offline_pairs"] = k
        if not examples:
            return None
        refs = compute_reference_logps(self.reference, examples, self.scorer.pad,
                                       batch_size=self.scorer.batch_size,
                                       device=self.scorer.device,
                                       precision=self.scorer.precision, layout=self.scorer.layout)
        for example, ref in zip(examples, refs):
            example["ref_logps"] = ref
        metrics["chosen_length"] = statistics.fmean(len(e["chosen_ids"]) for e in examples)
        metrics["rejected_length"] = statistics.fmean(len(e["rejected_ids"]) for e in examples)
        return self.scorer.units(examples)

    def after_update(self, units: Units, metrics: dict[str, float]) -> None:
        refresh = self.section.reference_refresh
        if refresh != "none" and (self.iteration + 1) % self.section.refresh_every == 0:
            if sharding.is_sharded(self.learner.model):  # FSDP2: from the gathered weights
                self._refresh_from(sharding.gathered_state_dict(self.learner.model), refresh)
            elif refresh == "hard":
                load_adapter_state_dict(self.reference, adapter_state_dict(self.learner.model))
            else:  # TR-DPO's soft update ref + α·(π − ref), once per tensor (tied ones too)
                policy = dict(named_tensors(self.learner.model))
                with torch.no_grad():
                    for key, ref in named_tensors(self.reference):
                        if ref.is_floating_point() and ref is not policy[key]:  # LoRA's base
                            ref.lerp_(policy[key].to(ref.dtype), self.section.refresh_alpha)
            self.refreshes += 1
        metrics["reference_refreshes"] = self.refreshes

    def _refresh_from(self, policy: dict[str, torch.Tensor], refresh: str) -> None:
        """The refresh of a reference from the policy's full state dict (no LoRA here)."""
        with torch.no_grad():
            for key, ref in named_tensors(self.reference):
                if ref.is_floating_point() and key in policy:
                    value = policy[key].to(ref.device, ref.dtype)
                    if refresh == "hard":
                        ref.copy_(value)
                    else:
                        ref.lerp_(value, self.section.refresh_alpha)

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"refreshes": self.refreshes}
        if self.section.reference_refresh != "none":
            state["reference"] = adapter_state_dict(self.reference)
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.refreshes = int(state["refreshes"])
        if state.get("reference") is not None:
            load_adapter_state_dict(self.reference, state["reference"])


def train_iterative_dpo(cfg: IterativeDPOConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` rounds of iterative DPO and save the final policy."""
    section = cfg.iterative_dpo
    plan = plan_paired_loss(section, "iterative_dpo")
    parts = build_parts(cfg, section, min_n=2, name="iterative_dpo")
    offline: list[dict[str, Any]] = []
    if section.offline_data is not None:
        data = DataSection(source=section.offline_data, limit=section.offline_limit)
        offline = load_preference_examples(data, cfg.world, parts.tokenizer, "paired").examples
        if not offline:
            raise ConfigError(f"field 'iterative_dpo.offline_data': no pairs in "
                              f"{section.offline_data}")
    # With a refresh the reference moves away from the starting model, so it is its own copy
    # of the policy (under LoRA: of the adapters, the base weights shared).
    reference = (parts.start.model if section.reference_refresh == "none"
                 else frozen_copy(parts.model).to(parts.device))
    learner = Learner(parts.model, PreferenceObjective(plan), cfg.train, epochs=section.epochs,
                      minibatch_size=section.minibatch_size, seed=cfg.train.seed)
    algorithm = IterativeDPO(parts, learner, section, reference=reference, offline=offline,
                             seed=cfg.train.seed)
    return run(parts, learner, algorithm, cfg, "iterative_dpo")


ALGORITHMS.register("iterative_dpo")(AlgorithmEntry(
    IterativeDPOConfig, train_iterative_dpo,
    "Iterative DPO (RLHF Workflow): rounds of sample, judge, several epochs of any paired loss; "
    "reference refresh (TR-DPO) and offline pairs mixed in at a stated ratio."))
