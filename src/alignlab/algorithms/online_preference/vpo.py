"""VPO (Cen et al. 2024, "Value-Incentivized Preference Optimization: A Unified Approach to
Online and Offline RLHF"): DPO plus the reward's value, regularised with a sign — optimism
online, pessimism offline — which through the implicit reward becomes a term in the policy's
log-ratios on samples of a calibration policy π_cal.

Per iteration (``vpo.mode``):

- ``online``: the policy samples ``rollout.n`` completions per prompt, paired (0, 1), (2, 3), …
  and ordered by the judge (ties and unlabelled pairs dropped); π_cal = π_ref, the starting
  model, samples as many completions on the same prompts (they are also the win-rate
  opponents), two per pair;
- ``offline``: the pairs are drawn from a fixed preference dataset (``offline_data``, the same
  number as online: ``rollout.prompts_per_step`` × ⌊n/2⌋, per iteration from the seed, so a
  resume draws the same); π_cal = the data's responses, the pair's own two completions. The
  policy still samples each iteration, only for the monitor (``kl_ref``, win rates); no labels.

The learner minimises, for ``epochs`` passes,  ℓ(β·h) + sign·α·β·mean_{y ∈ cal(pair)}
log π_θ(y)/π_ref(y)  (``losses.online_preference.vpo_value``, sign = +1 online, −1 offline),
ℓ any registered paired loss (DPO's −log σ by default), π_ref the starting model throughout.

Deviations: the paper's online update fits all the data gathered so far; here, as in online
DPO, each iteration trains on its own pairs. The choice of π_cal is the method's free
parameter; these two (π_ref online, the data offline) are ours, stated in the config.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
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
    plan_paired_loss,
    run,
    sample_ids,
)
from alignlab.algorithms.online_preference.value_term import (
    ValueTermObjective,
    pairs_with_calibration,
)
from alignlab.algorithms.preference.reference import compute_reference_logps
from alignlab.algorithms.preference.trainer import PreferenceSection, load_preference_examples
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
from alignlab.engine.controller import OnlineRun
from alignlab.engine.learner import Learner, Units
from alignlab.losses.online_preference import vpo_value
from alignlab.rollout.role import Rollouts

SIGN = {"online": 1, "offline": -1}
"""Optimism online (the value raised: exploration), pessimism offline (the value lowered)."""


class VPOSection(PreferenceSection, MonitorFields, RoundSchedule):
    """The preference trainer's loss fields (``loss``, ``beta``, ``loss_kwargs``), the judge,
    the mode, the value coefficient α, the offline data and the iteration's training schedule
    (its units are pairs)."""

    loss: str = "sigmoid"
    beta: float = Field(0.1, gt=0)
    """β of the paired loss and of the value term α·β·log π_θ(y)/π_ref(y)."""
    alpha: float = Field(0.1, ge=0)
    """α of the value term (0 is online, or offline, DPO)."""
    mode: Literal["online", "offline"] = "online"
    """``online``: the policy's own judged pairs, π_cal = the starting model's samples, sign +1;
    ``offline``: pairs of ``offline_data``, π_cal = the data's responses, sign −1."""
    epochs: int = Field(1, gt=0)
    """Passes over each iteration's pairs (1: one step per iteration, as online DPO)."""
    offline_data: str | None = None
    """``offline`` mode's preference pairs: a file or folder of ``preference`` rows, a Hub name,
    or ``world:<task>`` (the world's oracle pairs)."""
    offline_limit: int = Field(2048, gt=0)
    """Rows read from ``offline_data``."""

    @model_validator(mode="after")
    def _check_mode(self) -> "VPOSection":
        if (self.mode == "offline") != (self.offline_data is not None):
            raise ValueError("vpo.mode and vpo.offline_data go together: mode 'offline' needs "
                             "offline_data (e.g. world:positive); mode 'online' takes none")
        return self


class VPOConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)

    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/vpo", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=2)
    vpo: VPOSection = VPOSection()


@dataclass
class VPOPairs:
    """(chosen, rejected) sample indices, log π_ref of the policy's samples, and π_cal's
    samples with their log π_ref (online)."""

    pairs: list[tuple[int, int]]
    ref_logps: torch.Tensor | None = None
    calibration: Rollouts | None = None
    calibration_ref: torch.Tensor | None = None


class VPO(OnlinePreference):
    def __init__(self, parts: Parts, learner: Learner, section: VPOSection, *,
                 offline: list[dict[str, Any]], seed: int) -> None:
        super().__init__(parts, learner, section)
        self.offline, self.seed = offline, seed

    def judge(self, rows: list[dict[str, Any]], rollouts: Rollouts,
              metrics: dict[str, float]) -> VPOPairs:
        everything = range(len(rollouts.completions))
        if self.section.mode == "offline":
            self.monitor(rows, rollouts, metrics, self.start_logps(rollouts, everything))
            metrics["labels_total"] = self.labeller.totals["labels"]  # 0: nothing is judged
            return VPOPairs([])
        pairs = adjacent_pairs(self.labeller, rollouts, metrics)
        n = len(rollouts.completions) // len(rows)
        calibration = self.start.samples([r["prompt"] for r in rows], n, self.iteration)
        ref = self.start_logps(rollouts, everything)
        self.start.kl(rollouts, ref, metrics)
        if self.start.due(self.iteration):
            self.start.win_rates(rollouts.prompts, rollouts.completions,
                                 calibration.completions, metrics)
        return VPOPairs(pairs, ref, calibration, self.start_logps(calibration, everything))

    def make_batches(self, rows: list[dict[str, Any]], rollouts: Rollouts, judged: VPOPairs,
                     metrics: dict[str, float]) -> Units | None:
        if self.section.mode == "offline":
            return self._offline_units(len(rows) * (len(rollouts.completions) // len(rows) // 2),
                                       metrics)
        metrics["pairs"] = len(judged.pairs)
        if not judged.pairs:
            return None
        ref = judged.ref_logps
        pairs = [{"prompt_ids": list(rollouts.prompt_ids[c]),
                  "chosen_ids": sample_ids(rollouts, c, self.eos),
                  "rejected_ids": sample_ids(rollouts, r, self.eos),
                  "ref_logps": [float(ref[c]), float(ref[r])]} for c, r in judged.pairs]
        # π_cal's samples drawn beside a pair's two policy samples (the same prompt)
        cal, cal_ref = judged.calibration, judged.calibration_ref
        calibration = [[{"prompt_ids": list(cal.prompt_ids[i]),
                         "completion_ids": sample_ids(cal, i, self.eos),
                         "ref_logps": [float(cal_ref[i])]} for i in pair]
                       for pair in judged.pairs]
        return pairs_with_calibration(self.scorer, pairs, calibration)

    def _offline_units(self, k: int, metrics: dict[str, float]) -> Units | None:
        rng = random.Random(self.seed * 1_000_033 + self.iteration)
        picks = (rng.sample(range(len(self.offline)), k) if k <= len(self.offline)
                 else rng.choices(range(len(self.offline)), k=k))
        examples = [{key: self.offline[i][key] for key in ("prompt_ids", "chosen_ids",
                                                           "rejected_ids")} for i in picks]
        metrics["offline_pairs"] = len(examples)
        if not examples:
            return None
        refs = compute_reference_logps(self.start.model, examples, self.scorer.pad,
                                       batch_size=self.scorer.batch_size,
                                       device=self.scorer.device,
                                       precision=self.scorer.precision, layout=self.scorer.layout)
        for example, ref in zip(examples, refs):
            example["ref_logps"] = ref
        return self.scorer.units(examples)


def train_vpo(cfg: VPOConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` VPO iterations and save the final policy."""
    section = cfg.vpo
    plan = plan_paired_loss(section, "vpo")
    parts = build_parts(cfg, section, min_n=2, name="vpo")
    offline: list[dict[str, Any]] = []
    if section.mode == "offline":
        data = DataSection(source=section.offline_data, limit=section.offline_limit)
        offline = load_preference_examples(data, cfg.world, parts.tokenizer, "paired").examples
        if not offline:
            raise ConfigError(f"field 'vpo.offline_data': no pairs in {section.offline_data}")
    term = partial(vpo_value, sign=SIGN[section.mode], alpha=section.alpha, beta=section.beta)
    learner = Learner(parts.model, ValueTermObjective(plan, term, "vpo_value"), cfg.train,
                      epochs=section.epochs, minibatch_size=section.minibatch_size,
                      seed=cfg.train.seed)
    algorithm = VPO(parts, learner, section, offline=offline, seed=cfg.train.seed)
    return run(parts, learner, algorithm, cfg, "vpo")


ALGORITHMS.register("vpo")(AlgorithmEntry(
    VPOConfig, train_vpo,
    "VPO: DPO plus sign·α·β·log π(y)/π_ref(y) on calibration samples — optimistic online on "
    "the starting model's samples, pessimistic offline on a fixed dataset's pairs "
    "(Cen et al. 2024)."))
