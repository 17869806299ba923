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
   (``pool``, AlpacaFarm) or an LLM judge (``llm``); within the labelling budget
   (``judge.max_labels``); ties, identical pairs and pairs past the budget are dropped;
3. ``make_batches``: each pair becomes a preference example (prompt ids, chosen and rejected
   ids with the eos that ended them); log π_ref of both from one no-grad pass of the frozen
   reference; the units are pairs, collated by the preference family's ``collate_groups``;
4. the learner minimises any registered *paired* preference loss (``online_dpo.loss``, with
   the preference trainer's objective: DPO's sigmoid, IPO, hinge, …).
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

import torch

from alignlab.algorithms.common import (
    load_policy,
    load_prompt_source,
    render_chat_prompts,
    save_final,
)
from alignlab.algorithms.online_preference.judge_config import JudgeSection, make_judge
from alignlab.algorithms.preference.reference import compute_reference_logps
from alignlab.algorithms.preference.trainer import (
    PreferenceObjective,
    PreferenceSection,
    choose_layout,
    plan_losses,
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
from alignlab.core.runtime import pick_device, resolve_precision, seed_everything
from alignlab.data.preference_batches import collate_groups
from alignlab.engine.controller import OnlineAlgorithm, OnlineRun, OnlineSetup, Rows, run_online
from alignlab.engine.learner import Learner, Units
from alignlab.engine.run import prepare_run
from alignlab.models.adapters import reference_model
from alignlab.rewards.judges import BudgetedJudge, JudgedPair, PairwiseJudge, judge_pairs
from alignlab.rollout.role import RolloutRole, Rollouts


class OnlineDPOSection(PreferenceSection):
    """The preference trainer's loss fields (``loss``, ``beta``, ``loss_kwargs``) plus the judge."""

    loss: str = "sigmoid"
    judge: JudgeSection = JudgeSection()


class OnlineDPOConfig(Section):
    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection(output_dir="runs/online_dpo", lr=5e-6)
    rollout: RolloutSection = RolloutSection(n=2)
    online_dpo: OnlineDPOSection = OnlineDPOSection()


class OnlineDPO(OnlineAlgorithm):
    def __init__(self, judge: PairwiseJudge, reference: torch.nn.Module, learner: Learner, *,
                 eos: int, pad: int, layout: str, precision: str) -> None:
        self.judge_, self.reference, self.learner = judge, reference, learner
        self.eos, self.pad, self.layout, self.precision = eos, pad, layout, precision
        self.totals: Counter = Counter()

    def judge(self, rows: Rows, rollouts: Rollouts, metrics: dict[str, float]) -> list[JudgedPair]:
        groups: list[list[str]] = [[] for _ in rows]
        for i, g in enumerate(rollouts.prompt_index):
            groups[g].append(rollouts.completions[i])
        counts: Counter = Counter()
        pairs = judge_pairs([r["prompt"] for r in rows], groups, self.judge_, counts=counts)
        ties = sum(p.verdict.a_preferred is None for p in pairs)
        pairs = [p for p in pairs if p.verdict.a_preferred is not None]
        self.totals.update({"labels": len(pairs) + ties, "ties": ties, **counts})
        metrics.update({"pairs": len(pairs), "ties": ties,
                        "dropped_identical": counts["dropped_identical"],
                        "skipped": counts["skipped"],
                        "labels_total": self.totals["labels"],
                        "judge_p_chosen_mean": statistics.fmean(
                            p.verdict.p_a if p.chosen == p.a else 1 - p.verdict.p_a for p in pairs)
                        if pairs else float("nan")})
        if isinstance(self.judge_, BudgetedJudge):  # new labels paid for, cumulative
            metrics.update({"labels_used": self.judge_.labels_used,
                            "judge_cache_hits": self.judge_.cache_hits})
        return pairs

    def make_batches(self, rows: Rows, rollouts: Rollouts, pairs: list[JudgedPair],
                     metrics: dict[str, float]) -> Units | None:
        if not pairs:
            return None
        first = {g: i for i, g in reversed(list(enumerate(rollouts.prompt_index)))}

        def ids(i: int) -> list[int]:  # the eos that ended a completion is trained too
            eos = [self.eos] if rollouts.finish_reasons[i] == "eos" else []
            return list(rollouts.completion_ids[i]) + eos

        examples = [{"prompt_ids": list(rollouts.prompt_ids[first[p.group]]),
                     "chosen_ids": ids(first[p.group] + p.chosen),
                     "rejected_ids": ids(first[p.group] + p.rejected)} for p in pairs]
        refs = compute_reference_logps(self.reference, examples, self.pad,
                                       batch_size=self.learner.micro_batch_size,
                                       device=self.learner.device, precision=self.precision,
                                       layout=self.layout)
        for example, ref in zip(examples, refs):
            example["ref_logps"] = ref
        metrics["chosen_length"] = statistics.fmean(len(e["chosen_ids"]) for e in examples)
        metrics["rejected_length"] = statistics.fmean(len(e["rejected_ids"]) for e in examples)
        return Units(len(examples), lambda idx: collate_groups(
            [examples[i] for i in idx.tolist()], self.pad, layout=self.layout))

    def progress_info(self, metrics: dict[str, float]) -> str:
        return f"pairs {int(metrics.get('pairs', 0))}"

    def state_dict(self) -> dict[str, Any]:
        objective = self.learner.objective
        judge = self.judge_.counters() if isinstance(self.judge_, BudgetedJudge) else None
        return {"totals": dict(self.totals), "judge": judge,
                "objective": objective.state_dict() if objective.stateful else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = Counter(state["totals"])
        if state.get("judge") is not None and isinstance(self.judge_, BudgetedJudge):
            self.judge_.load_counters(state["judge"])
        if state.get("objective") is not None:
            self.learner.objective.load_state_dict(state["objective"])


def train_online_dpo(cfg: OnlineDPOConfig) -> OnlineRun:
    """Train ``cfg.train.max_steps`` online DPO iterations and save the final policy."""
    prepare_run(cfg)  # before anything slow is loaded
    section = cfg.online_dpo
    plan = plan_losses(section)
    offline_only = [f for f in ("reference", "reference_models", "heldout", "prefix_sharing")
                    if getattr(section, f) != PreferenceSection.model_fields[f].default]
    if offline_only:
        raise ConfigError(f"field 'online_dpo.{offline_only[0]}': not used by online DPO (the "
                          "reference is the initial policy); leave it unset")
    if plan.kind != "paired" or plan.needs.tokens or plan.needs.column_map() or plan.needs.multi:
        raise ConfigError(f"field 'online_dpo.loss': {section.loss!r} is not a paired loss on "
                          "sequence log-probs alone; pick one such as sigmoid, ipo, hinge")
    if cfg.rollout.n < 2:
        raise ConfigError(f"rollout.n: online DPO pairs a prompt's completions; set rollout.n "
                          f">= 2 (got {cfg.rollout.n})")
    seed_everything(cfg.train.seed)
    prompts, task = load_prompt_source(cfg.rollout, cfg.world, cfg.train.seed)
    device = pick_device(cfg.train.device)
    judge = make_judge(section.judge, task, cfg.train.seed, world=cfg.world, device=device)
    model, tokenizer = load_policy(cfg.model, cfg.world)
    render_chat_prompts(prompts, tokenizer)
    # The initial policy, copied before a checkpoint is loaded into the model (under LoRA: the
    # base with the adapters disabled, sharing its weights).
    reference = reference_model(model).to(device)
    layout = choose_layout(section, DataSection(), model,
                           checkpointing=cfg.train.gradient_checkpointing)
    learner = Learner(model, PreferenceObjective(plan), cfg.train, seed=cfg.train.seed)
    max_new = cfg.rollout.max_new_tokens or (task.max_new_tokens if task is not None else 64)
    rollout = RolloutRole(model, tokenizer, max_new_tokens=max_new,
                          temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          batch_size=cfg.rollout.batch_size)
    algorithm = OnlineDPO(judge, reference, learner, eos=rollout.eos, pad=rollout.pad,
                          layout=layout,
                          precision=resolve_precision(cfg.train.precision, device))
    setup = OnlineSetup(prompts, rollout, learner, algorithm, cfg.rollout.n,
                        cfg.rollout.prompts_per_step, gold=task.gold if task is not None else None)
    result = run_online(setup, cfg.train, "online_dpo")
    save_final(model, tokenizer, cfg, result.output_dir)
    return OnlineRun(result, model, tokenizer)


ALGORITHMS.register("online_dpo")(AlgorithmEntry(
    OnlineDPOConfig, train_online_dpo,
    "Online DPO: the current policy samples pairs, a judge labels them, any paired "
    "preference loss learns from them against the initial policy."))
