"""What every online preference algorithm shares: the judge and its label count, the starting
model (win rates, KL), sample ids and log-probs, the build of the parts and the run.

- **Judge.** ``JudgeSection`` and ``make_judge`` of online DPO, used as they are, so every
  ``judge.kind`` works for every algorithm here; pairs go through ``rewards.judges.judge_pairs``
  (identical pairs are ties with P = ½ and cost no label; pairs a judge leaves unlabelled come
  back as None and are skipped). ``Labeller`` counts the labels (``labels_total``) and keeps the
  judge's own counters (a budget's) across a resume.
- **Starting model.** A frozen copy of the initial policy, made before a checkpoint is loaded:
  each iteration the policy's samples are compared with its samples on the same prompts
  (``win_rate_judge`` by a separate judge of the same config, whose labels are not training
  labels, ``win_rate_gold`` by the task's gold reward) and ``kl_ref`` = the mean over the
  policy's samples of log π(y) − log π_start(y) (the sampler's log-probs, so at a temperature ≠ 1
  it is the KL of the tempered sampling policy).
- **Objectives and sections.** ``SampleObjective`` (units = the batch's groups: samples or
  pairs) with ``batch_tensors`` (the batch's extra tensors on the log-probs' device);
  ``RoundSchedule``, the epochs × minibatches fields of the methods that train several passes
  per iteration.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from alignlab.algorithms.common import (
    load_policy,
    load_prompt_source,
    render_chat_prompts,
    save_final,
)
from alignlab.algorithms.online_preference.judge_config import JudgeSection, make_judge
from alignlab.algorithms.preference.reference import compute_reference_logps
from alignlab.algorithms.preference.trainer import LossPlan, PreferenceSection, plan_losses
from alignlab.core.config import RolloutSection, Section
from alignlab.core.errors import ConfigError
from alignlab.core.runtime import pick_device, resolve_precision, seed_everything
from alignlab.data.preference_batches import collate_groups
from alignlab.engine.controller import OnlineAlgorithm, OnlineRun, OnlineSetup, run_online
from alignlab.engine.learner import Learner, Units
from alignlab.engine.placement import LocalPlacement, open_placement
from alignlab.engine.run import prepare_run
from alignlab.models.adapters import reference_model
from alignlab.models.logprobs import preferred_layout
from alignlab.rewards.judges import PairwiseJudge, Verdict, judge_pairs
from alignlab.rollout.backend import builtin_only
from alignlab.rollout.role import RolloutRole, Rollouts

TIE = Verdict(0.5, None, "identical")
"""The verdict on two identical completions: no preference, no label spent."""

# Seeds of the extra samples of an iteration, apart from the controller's (seed·7919 + it).
START_SAMPLES, MIXTURE_SAMPLES = 1_000_003, 2_000_003


class MonitorFields(Section):
    """The fields every online preference algorithm's section has."""

    judge: JudgeSection = JudgeSection()
    preference: Literal["probability", "label"] = "probability"
    """What P(y ≻ y′) is, where a method uses it: the judge's probability ``p_a`` or its label
    (1, ½ for a tie, 0; what a human annotator gives)."""
    win_rate_every: int = Field(1, ge=0)
    """Iterations between win rates against the starting model's samples (0: never)."""


class RoundSchedule(Section):
    """The fields of a method that trains several passes over each iteration's units."""

    epochs: int = Field(2, gt=0)
    """Passes over each iteration's units (the policy that sampled them stays fixed meanwhile)."""
    minibatch_size: int | None = Field(None, gt=0)
    """Units (samples or pairs) per optimizer step; None: all of the iteration's (one step per
    epoch)."""


class SampleObjective:
    """An objective whose units are the batch's groups (samples or pairs): ``num_items`` =
    ``num_groups``; a subclass defines ``loss(model, batch)``."""

    def num_items(self, batch: dict[str, Any]) -> float:
        return float(batch["num_groups"])


def batch_tensors(batch: dict[str, Any], device: torch.device, *names: str) -> list[torch.Tensor]:
    """The batch's row-aligned extras (``Scorer.units``' ``extras``) on ``device``."""
    return [batch[name].to(device) for name in names]


def preference_value(verdict: Verdict, mode: str) -> float:
    """P(a ≻ b) as the config says: the judge's probability, or its label."""
    if mode == "probability":
        return float(verdict.p_a)
    return 0.5 if verdict.a_preferred is None else float(verdict.a_preferred)


class Labeller:
    """A pairwise judge and the labels it gave (``labels_total``: judged pairs, ties included)."""

    def __init__(self, judge: PairwiseJudge, prefix: str = "") -> None:
        self.judge, self.prefix = judge, prefix
        self.totals: Counter = Counter()

    def verdicts(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
                 metrics: dict[str, float] | None = None) -> list[Verdict | None]:
        """One verdict per (prompt, a, b): the judge's, ``TIE`` for identical texts, None where
        the judge gave none (a budget's refusal)."""
        counts: Counter = Counter()
        judged = judge_pairs(prompts, [[x, y] for x, y in zip(a, b)], self.judge, counts=counts)
        out: list[Verdict | None] = [TIE if x == y else None for x, y in zip(a, b)]
        for pair in judged:
            out[pair.group] = pair.verdict
        ties = sum(p.verdict.a_preferred is None for p in judged)
        self.totals.update({"labels": len(judged), "ties": ties,
                            "dropped_identical": counts["dropped_identical"],
                            "skipped": counts["skipped"]})
        if metrics is not None:
            p = self.prefix
            metrics.update({f"{p}labels": len(judged), f"{p}ties": ties,
                            f"{p}labels_total": self.totals["labels"],
                            f"{p}dropped_identical": counts["dropped_identical"]})
            if counts["skipped"]:
                metrics[f"{p}skipped"] = counts["skipped"]
        return out

    def state_dict(self) -> dict[str, Any]:
        # A judge that keeps counters (a label budget) saves them for an exact resume.
        counters = getattr(self.judge, "counters", None)
        return {"totals": dict(self.totals), "judge": counters() if callable(counters) else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = Counter(state["totals"])
        if state.get("judge") is not None and hasattr(self.judge, "load_counters"):
            self.judge.load_counters(state["judge"])


def sample_ids(rollouts: Rollouts, i: int, eos: int) -> list[int]:
    """Completion ``i``'s ids with the eos that ended it (an action too: it is trained on)."""
    tail = [eos] if rollouts.finish_reasons[i] == "eos" else []
    return list(rollouts.completion_ids[i]) + tail


def by_prompt(rollouts: Rollouts) -> list[list[int]]:
    """The completions' indices grouped by prompt, in prompt order."""
    groups: list[list[int]] = [[] for _ in range(max(rollouts.prompt_index) + 1)]
    for i, g in enumerate(rollouts.prompt_index):
        groups[g].append(i)
    return groups


@dataclass
class Scorer:
    """No-grad sequence log-probs log π(y | x) of completions under any model."""

    pad: int
    layout: str
    batch_size: int
    device: torch.device
    precision: str

    def logps(self, model: torch.nn.Module, rollouts: Rollouts, indices: Sequence[int],
              eos: int) -> torch.Tensor:
        examples = [{"prompt_ids": list(rollouts.prompt_ids[i]),
                     "completion_ids": sample_ids(rollouts, i, eos)} for i in indices]
        if not examples:
            return torch.zeros(0)
        values = compute_reference_logps(model, examples, self.pad, batch_size=self.batch_size,
                                         device=self.device, precision=self.precision,
                                         layout=self.layout)
        return torch.tensor([v[0] for v in values], dtype=torch.float32)

    def units(self, examples: list[dict[str, Any]], **extras: torch.Tensor) -> Units:
        """``collate_groups`` micro-batches of ``examples`` with row-aligned ``extras`` ([B, ...])."""
        def take(idx: torch.Tensor) -> dict[str, Any]:
            batch = collate_groups([examples[i] for i in idx.tolist()], self.pad,
                                   layout=self.layout)
            batch.update({k: v[idx] for k, v in extras.items()})
            return batch
        return Units(len(examples), take)


class StartingModel:
    """The initial policy, frozen: its samples for win rates (or as XPO's reference samples) and
    its log-probs for the KL to it."""

    def __init__(self, model: torch.nn.Module, rollout: RolloutRole, scorer: Scorer, *,
                 judge: Callable[[], PairwiseJudge] | None, gold: Any, every: int,
                 seed: int) -> None:
        self.model, self.rollout, self.scorer = model, rollout, scorer
        self._make_judge, self.labeller = judge, None
        self.gold, self.every, self.seed = gold, every, seed

    def due(self, iteration: int) -> bool:
        return self.every > 0 and iteration % self.every == 0

    def samples(self, prompts: list[str], n: int, iteration: int) -> Rollouts:
        return self.rollout.generate(prompts, n, seed=self.seed * 7919 + iteration + START_SAMPLES)

    def kl(self, rollouts: Rollouts, start_logps: torch.Tensor, metrics: dict[str, float]) -> None:
        """``kl_ref``: mean log π(y) − log π_start(y) over the policy's samples (sampler log-probs)."""
        sampled = torch.tensor([sum(lp) for lp in rollouts.logprobs], dtype=torch.float32)
        metrics["kl_ref"] = float((sampled - start_logps).mean())

    def win_rates(self, prompts: list[str], policy: list[str], start: list[str],
                  metrics: dict[str, float], verdicts: list[Verdict | None] | None = None) -> None:
        """``win_rate_judge`` (wins + ½ ties over the judged pairs; ``verdicts`` when the pairs
        were judged already, e.g. XPO's training pairs) and ``win_rate_gold``."""
        if verdicts is None:
            if self.labeller is None:
                self.labeller = Labeller(self._make_judge(), prefix="win_rate/")
            verdicts = self.labeller.verdicts(prompts, policy, start, metrics)
        scored = [v for v in verdicts if v is not None]
        if scored:
            metrics["win_rate_judge"] = statistics.fmean(
                0.5 if v.a_preferred is None else float(v.a_preferred) for v in scored)
        if self.gold is not None:
            g = self.gold(list(prompts) * 2, list(policy) + list(start))
            n = len(policy)
            metrics["win_rate_gold"] = statistics.fmean(
                0.5 if a == b else float(a > b) for a, b in zip(g[:n], g[n:]))

    def state_dict(self) -> dict[str, Any]:
        return {"labeller": self.labeller.state_dict() if self.labeller is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("labeller") is not None:
            if self.labeller is None:
                self.labeller = Labeller(self._make_judge(), prefix="win_rate/")
            self.labeller.load_state_dict(state["labeller"])


@dataclass
class Parts:
    """What the algorithms of this package are built from (``build_parts``)."""

    model: torch.nn.Module
    tokenizer: Any
    task: Any
    prompts: Any
    rollout: RolloutRole
    labeller: Labeller
    start: StartingModel
    scorer: Scorer
    device: torch.device
    max_new_tokens: int
    eos: int
    extra: dict[str, Any] = field(default_factory=dict)
    placement: Any = field(default_factory=LocalPlacement)
    """Where the policy's rollouts and the judges run (``train.placement``)."""


class OnlinePreference(OnlineAlgorithm):
    """The hooks' shared half: the iteration number, the policy's and the starting model's
    log-probs, the monitor (win rates, KL), the labels and the checkpointed state."""

    def __init__(self, parts: Parts, learner: Learner, section: MonitorFields) -> None:
        self.parts, self.learner, self.section = parts, learner, section
        self.labeller, self.start, self.scorer = parts.labeller, parts.start, parts.scorer
        self.eos = parts.eos
        self.iteration = 0

    def begin_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        # The starting model samples the policy role's prompts: seeded by their index in the
        # iteration's whole batch (this rank's share starts there, engine/controller.py).
        self.start.rollout.prompt_offset = self.parts.rollout.prompt_offset

    def policy_logps(self, rollouts: Rollouts, indices: Sequence[int]) -> torch.Tensor:
        """log π_θ(y) of the current policy (no gradient): the 'old' log-probs of the round."""
        return self.scorer.logps(self.learner.model, rollouts, indices, self.eos)

    def start_logps(self, rollouts: Rollouts, indices: Sequence[int]) -> torch.Tensor:
        return self.scorer.logps(self.start.model, rollouts, indices, self.eos)

    def monitor(self, rows: list[dict[str, Any]], rollouts: Rollouts, metrics: dict[str, float],
                start_logps: torch.Tensor) -> None:
        """``kl_ref`` from the policy's samples' log-probs under the starting model, and (when
        due) win rates against the starting model's samples, one per policy sample."""
        self.start.kl(rollouts, start_logps, metrics)
        if self.start.due(self.iteration):
            n = len(rollouts.completions) // len(rows)
            theirs = self.start.samples([r["prompt"] for r in rows], n, self.iteration)
            self.start.win_rates(rollouts.prompts, rollouts.completions, theirs.completions,
                                 metrics)

    def preference(self, verdict: Verdict) -> float:
        return preference_value(verdict, self.section.preference)

    def progress_info(self, metrics: dict[str, float]) -> str:
        w = metrics.get("win_rate_gold")
        return f"labels {int(metrics.get('labels_total', 0))}" + (
            f" win {w:.2f}" if w is not None else "")

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``extra_state``."""

    def state_dict(self) -> dict[str, Any]:
        objective = self.learner.objective  # a preference loss may keep state (BCO's shift)
        return {"labeller": self.labeller.state_dict(), "start": self.start.state_dict(),
                "objective": objective.state_dict() if getattr(objective, "stateful", False)
                else None, "extra": self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labeller.load_state_dict(state["labeller"])
        self.start.load_state_dict(state["start"])
        if state.get("objective") is not None:
            self.learner.objective.load_state_dict(state["objective"])
        self.load_extra_state(state["extra"])

    def rank_state_dict(self) -> dict[str, Any]:
        """The labels this process's judges gave (and their budgets' counters)."""
        return {"labeller": self.labeller.state_dict(), "start": self.start.state_dict()}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        self.labeller.load_state_dict(state["labeller"])
        self.start.load_state_dict(state["start"])


def logit(p: float, eps: float = 1e-3) -> float:
    """log(p / (1 − p)) with p kept in [ε, 1 − ε] (a label of 1 or 0 stays finite: ±6.9)."""
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def plan_paired_loss(section: PreferenceSection, name: str) -> LossPlan:
    """The loss plan of a section with the preference trainer's loss fields: paired losses on
    sequence log-probs only (what online pairs give); the offline-only fields refused. Errors
    name ``<name>.<field>``."""
    try:
        plan = plan_losses(section)
    except ConfigError as e:
        raise ConfigError(str(e).replace("'preference.", f"'{name}.")) from None
    for f in ("reference", "reference_models", "heldout", "prefix_sharing"):
        if getattr(section, f) != PreferenceSection.model_fields[f].default:
            raise ConfigError(f"field '{name}.{f}': not used by {name} (the reference is the "
                              "initial policy); leave it unset")
    if plan.kind != "paired" or plan.needs.tokens or plan.needs.column_map() or plan.needs.multi:
        raise ConfigError(f"field '{name}.loss': {section.loss!r} is not a paired loss on "
                          "sequence log-probs alone; pick one such as sigmoid, ipo, hinge")
    return plan


def round_robin(labeller: Labeller, rollouts: Rollouts, groups: list[list[int]], mode: str,
                metrics: dict[str, float]) -> list[float]:
    """P̂(y ≻ π) of every sample: the mean of P(y ≻ y′) over its prompt's samples y′, itself
    included (P = ½); every pair of a prompt judged once, P(y′ ≻ y) = 1 − P(y ≻ y′); pairs
    left unlabelled do not count."""
    cand = [(g[i], g[j]) for g in groups for i in range(len(g)) for j in range(i + 1, len(g))]
    verdicts = labeller.verdicts([rollouts.prompts[a] for a, _ in cand],
                                 [rollouts.completions[a] for a, _ in cand],
                                 [rollouts.completions[b] for _, b in cand], metrics)
    sums, counts = [0.5] * len(rollouts.completions), [1] * len(rollouts.completions)
    for (a, b), v in zip(cand, verdicts):
        if v is not None:
            p = preference_value(v, mode)
            sums[a] += p
            sums[b] += 1 - p
            counts[a] += 1
            counts[b] += 1
    return [s / c for s, c in zip(sums, counts)]


def adjacent_pairs(labeller: Labeller, rollouts: Rollouts,
                   metrics: dict[str, float]) -> list[tuple[int, int]]:
    """Each prompt's samples paired (0, 1), (2, 3), …, one label each: the judged pairs as
    (chosen, rejected) sample indices; ties and pairs left unlabelled are dropped."""
    cand = [(g[j], g[j + 1]) for g in by_prompt(rollouts) for j in range(0, len(g) - 1, 2)]
    verdicts = labeller.verdicts([rollouts.prompts[a] for a, _ in cand],
                                 [rollouts.completions[a] for a, _ in cand],
                                 [rollouts.completions[b] for _, b in cand], metrics)
    return [(a, b) if v.a_preferred else (b, a) for (a, b), v in zip(cand, verdicts)
            if v is not None and v.a_preferred is not None]


def check_on_policy(rollout: RolloutSection, name: str) -> None:
    """Policy-gradient estimates need samples from π_θ itself, not a tempered or truncated π."""
    if rollout.temperature != 1.0:
        raise ConfigError(f"field 'rollout.temperature': {name} needs samples from the policy "
                          f"itself (its gradient is on-policy); set it to 1 "
                          f"(got {rollout.temperature})")
    if rollout.top_p != 1.0:
        raise ConfigError(f"field 'rollout.top_p': {name} needs samples from the policy itself; "
                          f"set it to 1 (got {rollout.top_p})")


def build_parts(cfg: Any, section: MonitorFields, *, min_n: int, name: str) -> Parts:
    """Load prompts, judge, policy and tokenizer; copy the starting model before any checkpoint
    is loaded; the rollout roles of the policy and of the starting model."""
    builtin_only(cfg.rollout.backend, name)
    prepare_run(cfg)  # before anything slow is loaded
    if cfg.rollout.n < min_n:
        raise ConfigError(f"rollout.n: {name} needs at least {min_n} completions per prompt "
                          f"(got {cfg.rollout.n})")
    seed_everything(cfg.train.seed)
    prompts, task = load_prompt_source(cfg.rollout, cfg.world, cfg.train.seed)
    device = pick_device(cfg.train.device)
    placement = open_placement(cfg.train, name)

    def judge() -> Any:
        return make_judge(section.judge, task, cfg.train.seed, world=cfg.world,
                          device=cfg.train.device, field=f"{name}.judge", place=placement.judge)

    labeller = Labeller(judge())
    model, tokenizer = load_policy(cfg.model, cfg.world)
    render_chat_prompts(prompts, tokenizer)
    start_model = reference_model(model).to(device)  # LoRA: adapters disabled, no weight copied
    preferred, _ = preferred_layout(model, checkpointing=cfg.train.gradient_checkpointing)
    layout = "shared" if preferred == "shared" else "flat"
    max_new = cfg.rollout.max_new_tokens or (task.max_new_tokens if task is not None else 64)

    precision = resolve_precision(cfg.train.precision, device)

    def role(m: torch.nn.Module, **kwargs: Any) -> RolloutRole:
        return RolloutRole(m, tokenizer, max_new_tokens=max_new,
                           temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                           batch_size=cfg.rollout.batch_size, precision=precision, **kwargs)

    # The policy's rollouts may run on workers; the starting model's and Nash-MD's mixture's
    # sample here (role(...) below).
    rollout = role(model, backend=placement.rollout_backend(
        functools.partial(load_policy, cfg.model, cfg.world), tokenizer,
        batch_size=cfg.rollout.batch_size))
    scorer = Scorer(rollout.pad, layout, 2 * cfg.train.batch_size, device, precision)
    start = StartingModel(start_model, role(start_model), scorer,
                          judge=judge,
                          gold=task.gold if task is not None else None,
                          every=section.win_rate_every, seed=cfg.train.seed)
    return Parts(model, tokenizer, task, prompts, rollout, labeller, start, scorer, device,
                 max_new, rollout.eos, {"role": role}, placement)


def run(parts: Parts, learner: Learner, algorithm: OnlinePreference, cfg: Any,
        name: str) -> OnlineRun:
    """The controller's loop, then the final model."""
    setup = OnlineSetup(parts.prompts, parts.rollout, learner, algorithm, cfg.rollout.n,
                        cfg.rollout.prompts_per_step,
                        gold=parts.task.gold if parts.task is not None else None)
    with parts.placement:
        result = run_online(setup, cfg.train, name)
    save_final(parts.model, parts.tokenizer, cfg, result.output_dir)
    return OnlineRun(result, parts.model, parts.tokenizer)


__all__ = ["Labeller", "MonitorFields", "OnlinePreference", "Parts", "RoundSchedule",
           "SampleObjective", "Scorer", "StartingModel", "TIE", "adjacent_pairs", "batch_tensors",
           "build_parts", "by_prompt", "check_on_policy", "logit", "plan_paired_loss",
           "preference_value", "round_robin", "run", "sample_ids"]
