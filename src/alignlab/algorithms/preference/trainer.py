"""One trainer for the whole DPO family: paired, unpaired and listwise preference losses.

``L = Σ_k w_k · loss_k(π(y|x), π_ref(y|x), ...)`` summed over pairs / rows / lists, with any
loss of ``alignlab.losses.preference`` (Rafailov et al. 2023, "Direct Preference Optimization",
and its family). One forward scores every completion of a micro-batch (chosen and rejected
together), the shared prompt computed once when prefix sharing is on (Wang et al. 2024,
"Accelerating Direct Preference Optimization with Prefix Sharing"); reference log-probs are
computed once before training with the frozen reference (``trainers/reference.py``) and
reference-free losses never load it. KTO's z₀ is estimated from mismatched prompt/completion
pairs (no gradient); BCO's reward shift δ is the running mean of βr kept by the trainer.
Per-token, multi-reference, tie, group and reward inputs: ``trainers/preference_inputs.py``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from alignlab.algorithms.common import load_policy, save_final
from alignlab.algorithms.preference.inputs import (
    GROUP_WEIGHTS,
    GroupWeights,
    InputNeeds,
    check_references,
    input_needs,
    paired_extras,
    policy_logps,
)
from alignlab.algorithms.preference.reference_setup import prepare_reference
from alignlab.core.config import (
    DataSection,
    EvalSection,
    ModelSection,
    Section,
    TrainSection,
    WorldSection,
)
from alignlab.core.errors import ConfigError
from alignlab.core.io import atomic_write_text
from alignlab.core.runtime import pick_device, resolve_precision
from alignlab.data.batches import EpochBatches
from alignlab.data.loading import load_rows, rows_from_list
from alignlab.data.preference_batches import KIND_FORMATS, add_kl_completions, collate_groups
from alignlab.data.preference_columns import (
    assign_group_ids,
    attach_values,
    check_columns,
    fill_defaults,
)
from alignlab.data.tokenize import TokenizedRows, tokenize_rows
from alignlab.engine import distributed, sharding
from alignlab.engine.loop import LossOutput, TrainResult, train
from alignlab.engine.run import prepare_run
from alignlab.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceInputs,
    combine_losses,
    loss_spec,
)
from alignlab.models.logprobs import completion_logprobs, preferred_layout
from alignlab.models.quantize import Quantization
from alignlab.world.preference_rows import world_preference_rows
from alignlab.world.resolve import is_world, world_task

# The PreferenceInputs fields this trainer fills, per data kind (columns when the data has them).
PROVIDED = {
    "paired": {"chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
               "chosen_lengths", "rejected_lengths", "margin", "ties", "groups",
               "ref_chosen_logps_multi", "ref_rejected_logps_multi", "chosen_token_logps",
               "rejected_token_logps", "ref_chosen_token_logps", "ref_rejected_token_logps",
               "chosen_mask", "rejected_mask"},
    "unpaired": {"logps", "ref_logps", "labels", "kl_ref", "rewards", "values"},
    "listwise": {"list_logps", "ref_list_logps", "scores", "list_lengths", "list_mask"},
}
SHIFT_PARAM = "reward_shift"
STATE_FILE = "preference_state.json"  # BCO's running reward shift δ, group-robust weights α


class PreferenceSection(Section):
    loss: str = "dpo"
    """A registered preference loss (``alignlab list losses``); ignored when ``losses`` is set."""
    losses: dict[str, float] | None = None
    """A weighted mixture, e.g. MPO ``{sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}``."""
    beta: float | None = Field(None, gt=0)
    """β for every loss that takes one; None keeps each loss's own default."""
    loss_kwargs: dict[str, Any] = {}
    """Other hyper-parameters, passed to every loss whose signature has them."""
    per_loss: dict[str, dict[str, Any]] = {}
    """Hyper-parameters for one loss of a mixture only."""
    reference: str | None = None
    """The reference model; None = the policy's starting weights (``model.name_or_path``)."""
    reference_models: list[str] | None = Field(None, min_length=1)
    """MRPO's references (column 0 is the main one and its clip anchor), each precomputed once
    and cached; None = the single usual reference."""
    group_step_size: float = Field(0.01, gt=0)
    """η of group-robust DPO's weight update α_g ∝ α_g·exp(η·L_g) after every micro-batch."""
    value_baseline: Literal["prompt_mean", "mean", "zero"] = "prompt_mean"
    """DRO's V(x): ``prompt_mean`` (leave-one-out mean reward of the prompt's training rows),
    ``mean`` (of all training rows) or ``zero``."""
    precompute_reference: bool = True
    reference_quantization: Quantization = "none"
    """``int8``: the reference's decoder matmuls run as dynamic int8 (CPU, fp32 precision), about
    two thirds of the reference pass's time; on the world's base model its log-probs are within
    1 nat per sequence of float32's and a pair's margin within 0.8 nat (means 0.11 and 0.17,
    the worst 0.40-0.71 and 0.61-0.63 depending on the CPU's kernels;
    ``tests/test_models_quantize.py``), so with β = 0.1 DPO's logit moves by under 0.08.
    ``none`` keeps them exact."""
    prefix_sharing: bool | None = None
    """Compute each prompt once for all its completions; None = on when exact for the model.
    SDPA decoders run each prompt with its completions as one row of a packed, padding-free
    pass; others a prompt pass with KV cache, then the completions
    (:func:`alignlab.models.logprobs.fast_path` decides)."""
    heldout: int = Field(0, ge=0)
    """Rows kept out of training; their loss and reward accuracy go to ``heldout.json``."""
    ipo_length_normalize: bool = False
    """IPO on per-token (length-normalised) log-ratios, TRL's convention; off = Azar et al.'s sums."""


@dataclass(frozen=True)
class LossPlan:
    """What the config's losses need, resolved once."""

    weights: dict[str, float]
    kind: str
    needs_reference: bool
    hyper_parameters: dict[str, Any]
    per_loss: dict[str, dict[str, Any]]
    shifted: tuple[str, ...]  # losses whose reward_shift δ the trainer keeps
    needs: InputNeeds = InputNeeds()
    group_robust: tuple[str, ...] = ()  # losses whose group weights α the trainer keeps


def plan_losses(section: PreferenceSection) -> LossPlan:
    """Validate loss names, kinds and hyper-parameters; errors name the config field."""
    weights = dict(section.losses) if section.losses else {section.loss: 1.0}
    field = "preference.losses" if section.losses else "preference.loss"
    specs = {}
    for name in weights:
        if name not in PREFERENCE_LOSSES.names():
            raise ConfigError(f"field '{field}': unknown loss {name!r}; allowed values: "
                              f"{', '.join(PREFERENCE_LOSSES.names())}")
        specs[name] = loss_spec(name)
    kinds = {s.kind for s in specs.values()}
    if len(kinds) > 1:
        raise ConfigError(f"field '{field}': cannot mix loss kinds {sorted(kinds)} "
                          f"({', '.join(f'{n}: {s.kind}' for n, s in specs.items())})")
    kind = kinds.pop()
    for name, spec in specs.items():
        missing = sorted(set(spec.requires) - PROVIDED[kind])
        if missing:
            raise ConfigError(f"field '{field}': loss {name!r} needs {', '.join(missing)}, which "
                              f"this trainer does not compute for {kind} data; pick another loss")
    accepted = {name: set(spec.defaults) for name, spec in specs.items()}
    every = sorted(set().union(*accepted.values()))
    hp = dict(section.loss_kwargs)
    for key in hp:
        if key not in every:
            raise ConfigError(f"field 'preference.loss_kwargs.{key}': not a hyper-parameter of "
                              f"{', '.join(weights)}; accepted names: {', '.join(every) or 'none'}")
    if section.beta is not None:
        if "beta" not in every:
            raise ConfigError(f"field 'preference.beta': {', '.join(weights)} take(s) no beta; "
                              "leave it unset")
        hp["beta"] = section.beta
    for name, kwargs in section.per_loss.items():
        if name not in weights:
            raise ConfigError(f"field 'preference.per_loss.{name}': not one of the losses "
                              f"{', '.join(weights)}")
        for key in kwargs:
            if key not in accepted[name]:
                raise ConfigError(f"field 'preference.per_loss.{name}.{key}': not a "
                                  f"hyper-parameter of {name}; accepted names: "
                                  f"{', '.join(sorted(accepted[name]))}")
    shifted, robust = (tuple(n for n in weights if p in accepted[n] and p not in hp
                             and p not in section.per_loss.get(n, {}))
                       for p in (SHIFT_PARAM, GROUP_WEIGHTS))
    needs = input_needs(specs)
    check_references(section, needs.multi, hp, section.per_loss)
    per_loss = {k: dict(v) for k, v in section.per_loss.items()}
    if section.ipo_length_normalize:
        if "ipo" not in weights:
            raise ConfigError("field 'preference.ipo_length_normalize': only the ipo loss reads it")
        per_loss.setdefault("ipo", {})["length_normalize"] = True
    return LossPlan(weights, kind, any(s.needs_reference for s in specs.values()), hp,
                    per_loss, shifted, needs, robust)


class PreferenceObjective:
    """Sum of per-example preference losses; ``num_items`` = pairs / rows / lists.

    ``reference_model`` is used only when the batches carry no precomputed ``ref_logps``;
    ``groups`` (the data's group names and shares) only by group-robust losses."""

    def __init__(self, plan: LossPlan, reference_model: torch.nn.Module | None = None, *,
                 groups: tuple[list[str | int], list[float]] | None = None,
                 group_step_size: float = 0.01) -> None:
        self.plan, self.reference_model = plan, reference_model
        self.shift_mean, self.shift_count = 0.0, 0  # BCO's running δ (TRL's RunningMoments)
        self.synced_shift = (0.0, 0)  # δ when the processes last agreed (``sync_across_ranks``)
        self.group_weights = (GroupWeights(groups[0], group_step_size, groups[1])
                              if plan.group_robust and groups else None)

    @property
    def stateful(self) -> bool:
        """Whether the objective keeps state across steps (saved for an exact resume)."""
        return bool(self.plan.shifted) or self.group_weights is not None

    def num_items(self, batch: dict[str, Any]) -> float:
        return float(batch["num_groups"])

    def reference_logps(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if not self.plan.needs_reference:
            return None
        if batch.get("ref_logps") is not None:
            return batch["ref_logps"]
        if self.reference_model is None:
            raise ConfigError("preference.precompute_reference is false but no reference model "
                              "was given")
        with torch.no_grad():
            return completion_logprobs(self.reference_model, batch).float()

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        logps, token_logps = policy_logps(model, batch, self.plan.needs.tokens, completion_logprobs)
        ref = self.reference_logps(batch)
        inputs, metrics = self.inputs(logps, ref, batch, token_logps)
        per_loss = {k: dict(v) for k, v in self.plan.per_loss.items()}
        if self.plan.shifted and ref is not None:
            self._update_shift(logps, ref, batch)
            for name in self.plan.shifted:
                per_loss.setdefault(name, {})[SHIFT_PARAM] = self.shift_mean
        if self.group_weights is not None:
            for name in self.plan.group_robust:
                per_loss.setdefault(name, {})[GROUP_WEIGHTS] = self.group_weights.weights
        if len(self.plan.weights) == 1:
            (name,) = self.plan.weights
            result = PREFERENCE_LOSSES.get(name)(inputs, **self._kwargs(name, per_loss))
        else:
            result = combine_losses(self.plan.weights, inputs, per_loss=per_loss,
                                    **self.plan.hyper_parameters)
        metrics.update({k: float(v) for k, v in result.metrics.items() if torch.as_tensor(v).numel() == 1})
        if self.plan.shifted:
            metrics["reward_shift"] = self.shift_mean
        if self.group_weights is not None:
            for name in self.plan.group_robust:
                key = "group/losses" if len(self.plan.weights) == 1 else f"{name}/group/losses"
                self.group_weights.update(result.metrics[key], batch["groups"])
            metrics.update(self.group_weights.metrics())
        return LossOutput(result.losses.sum(), metrics)

    def _kwargs(self, name: str, per_loss: dict[str, dict[str, Any]]) -> dict[str, Any]:
        accepted = loss_spec(name).defaults
        kwargs = {k: v for k, v in self.plan.hyper_parameters.items() if k in accepted}
        kwargs.update(per_loss.get(name, {}))
        return kwargs

    def _update_shift(self, logps: torch.Tensor, ref: torch.Tensor, batch: dict[str, Any]) -> None:
        main = batch["slot"] < (2 if self.plan.kind == "paired" else 1)
        beta = self.plan.hyper_parameters.get("beta", loss_spec(self.plan.shifted[0]).defaults["beta"])
        rewards = beta * (logps.detach() - ref)[main].float()
        n = rewards.numel()
        self.shift_mean = (self.shift_mean * self.shift_count + float(rewards.sum())) / (self.shift_count + n)
        self.shift_count += n

    def sync_across_ranks(self) -> None:
        """With N processes, after each optimizer step's micro-batches (``engine/loop.py``):
        δ becomes the running mean over every rank's rewards and α the result of every rank's
        updates, the same on every rank (within a step each rank's share used the step's
        starting δ, where one process with accumulation updates it between micro-batches)."""
        if self.plan.shifted:
            mean0, count0 = self.synced_shift
            added, n = distributed.global_sum([self.shift_mean * self.shift_count - mean0 * count0,
                                               self.shift_count - count0])
            self.shift_count = count0 + int(round(n))
            self.shift_mean = (mean0 * count0 + added) / self.shift_count if self.shift_count else 0.0
            self.synced_shift = (self.shift_mean, self.shift_count)
        if self.group_weights is not None:
            self.group_weights.sync()

    def inputs(self, logps: torch.Tensor, ref: torch.Tensor | None, batch: dict[str, Any],
               token_logps: torch.Tensor | None = None) -> tuple[PreferenceInputs, dict[str, float]]:
        """Split the flat per-completion log-probs into the loss kind's fields."""
        b, lengths = int(batch["num_groups"]), batch["completion_lengths"]
        metrics: dict[str, float] = {}
        if ref is not None:
            metrics["kl_proxy"] = float((logps.detach() - ref).mean())
        if self.plan.kind == "paired":
            metrics["logps/chosen"] = float(logps[:b].detach().mean())
            metrics["logps/rejected"] = float(logps[b:].detach().mean())
            return PreferenceInputs(
                chosen_logps=logps[:b], rejected_logps=logps[b:],
                ref_chosen_logps=None if ref is None else ref[:b],
                ref_rejected_logps=None if ref is None else ref[b:],
                chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
                margin=batch.get("margin"),
                **paired_extras(batch, b, self.plan.needs, ref, token_logps,
                                self.reference_model)), metrics
        if self.plan.kind == "unpaired":
            kl_ref = None
            if logps.shape[0] > b and ref is not None:  # KTO's mismatched pairs (slot 1)
                kl_ref = (logps[b:].detach() - ref[b:]).mean().clamp(min=0)
                metrics["kl_ref"] = float(kl_ref)
            metrics["logps"] = float(logps[:b].detach().mean())
            return PreferenceInputs(logps=logps[:b], ref_logps=None if ref is None else ref[:b],
                                    labels=batch.get("labels"), kl_ref=kl_ref,
                                    rewards=batch.get("rewards"), values=batch.get("values")), metrics
        k = int(batch["slot"].max()) + 1
        owner, slot = batch["owner"], batch["slot"]

        def grid(values: torch.Tensor) -> torch.Tensor:
            out = values.new_zeros(b, k)
            return out.index_put((owner, slot), values)

        mask = torch.zeros(b, k, dtype=torch.bool, device=logps.device).index_put(
            (owner, slot), torch.ones_like(owner, dtype=torch.bool))
        metrics["logps"] = float(logps.detach().mean())
        return PreferenceInputs(list_logps=grid(logps), ref_list_logps=None if ref is None else grid(ref),
                                scores=batch["scores"], list_lengths=grid(lengths), list_mask=mask), metrics

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"shift_mean": self.shift_mean, "shift_count": self.shift_count}
        if self.group_weights is not None:
            state[GROUP_WEIGHTS] = self.group_weights.weights.tolist()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shift_mean, self.shift_count = float(state["shift_mean"]), int(state["shift_count"])
        self.synced_shift = (self.shift_mean, self.shift_count)
        if self.group_weights is not None and GROUP_WEIGHTS in state:
            self.group_weights.weights = torch.tensor(state[GROUP_WEIGHTS], dtype=torch.float64)
            self.group_weights.synced = self.group_weights.weights.clone()


class PreferenceConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection(output_dir="runs/preference", lr=1e-5, max_steps=200, batch_size=8)
    world: WorldSection = WorldSection()
    preference: PreferenceSection = PreferenceSection()
    eval: EvalSection | None = None


@dataclass
class PreferenceRun:
    result: TrainResult
    model: torch.nn.Module
    tokenizer: Any
    objective: PreferenceObjective
    examples: list[dict[str, Any]]
    layout: str
    reference_cache_hit: bool | None  # None: no precomputed reference (reference-free or on the fly)
    heldout: dict[str, float] | None = None


def load_preference_examples(data: DataSection, world: WorldSection, tokenizer: Any, kind: str,
                             columns: dict[str, list[str]] | None = None) -> TokenizedRows:
    """Tokenised rows of the format the loss kind needs (``world:<task>`` builds oracle rows);
    every row must carry the data ``columns`` (column → losses needing it)."""
    columns = columns or {}
    fmt = KIND_FORMATS[kind]
    if data.format is not None and data.format != fmt:
        raise ConfigError(f"fields 'preference.loss' and 'data.format': a {kind} loss needs "
                          f"data.format {fmt!r}, got {data.format!r}")
    if is_world(data.source):
        task = world_task(data.source, world, "data.source")
        extra = set(columns) & {"tie", "group", "reward"}
        rows = rows_from_list(world_preference_rows(task, fmt, data.limit or 2048, seed=world.seed,
                                                    columns=extra), format=fmt, source=data.source)
    else:
        rows = load_rows(data.source, format=data.format, split=data.split, limit=data.limit)
    if rows.format != fmt:
        raise ConfigError(f"fields 'preference.loss' and 'data.format': a {kind} loss needs "
                          f"{fmt!r} rows, but {rows.source} has {rows.format!r} rows")
    check_columns(rows, columns)
    tokenized = tokenize_rows(rows, tokenizer, max_length=data.max_length, truncation=data.truncation)
    print(f"data {rows.source}: {tokenized.summary()}")
    if not tokenized.examples:
        raise ConfigError(f"data.source {data.source}: no rows left after truncation")
    return tokenized


def choose_layout(section: PreferenceSection, data: DataSection, model: torch.nn.Module,
                  per_token: bool = False, checkpointing: bool = False) -> str:
    """``shared`` (prefix sharing), ``packed`` (data.packing) or ``flat`` (padded); token-level
    losses read per-token log-probs, which prefix sharing keeps only in its one-pass form (SDPA
    decoders)."""
    preferred, why = preferred_layout(model, per_token=per_token, checkpointing=checkpointing)
    ok = preferred == "shared"
    if section.prefix_sharing and not ok:
        raise ConfigError(f"field 'preference.prefix_sharing': not exact for this model ({why}); "
                          "set it to false")
    if section.prefix_sharing and data.packing:
        raise ConfigError("fields 'preference.prefix_sharing' and 'data.packing': pick one "
                          "(prefix sharing already skips the prompt's second copy)")
    if data.packing:
        return "packed"
    return "shared" if (section.prefix_sharing is not False and ok) else "flat"


def run_preference(cfg: PreferenceConfig) -> PreferenceRun:
    """Load policy and data, precompute the reference log-probs (if any loss needs them), train
    and save the final model."""
    prepare_run(cfg)  # before anything slow is loaded
    plan = plan_losses(cfg.preference)
    model, tokenizer = load_policy(cfg.model, cfg.world, seed=cfg.train.seed)
    columns = plan.needs.column_map()
    tokenized = load_preference_examples(cfg.data, cfg.world, tokenizer, plan.kind, columns)
    examples, pad = tokenized.examples, tokenized.pad_token_id
    fill_defaults(examples, list(columns))
    groups = assign_group_ids(examples) if "group" in columns else None
    if plan.kind == "unpaired" and "kl_ref" in set().union(*(loss_spec(n).optional for n in plan.weights)):
        add_kl_completions(examples, seed=cfg.train.seed)
    layout = choose_layout(cfg.preference, cfg.data, model, per_token=plan.needs.tokens,
                           checkpointing=cfg.train.gradient_checkpointing)
    device = pick_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    ref_model, hit = (prepare_reference(cfg, model, plan.needs.tokens, examples, pad, layout,
                                        device, precision) if plan.needs_reference else (None, None))
    objective = PreferenceObjective(plan, ref_model, groups=groups,
                                    group_step_size=cfg.preference.group_step_size)
    n_held = cfg.preference.heldout
    if n_held >= len(examples):
        raise ConfigError(f"field 'preference.heldout': {n_held} rows leave none of the "
                          f"{len(examples)} to train on")
    held, examples = examples[len(examples) - n_held:], examples[:len(examples) - n_held]
    if plan.needs.values and "reward" in examples[0]:
        attach_values(examples, held, cfg.preference.value_baseline)
    state_file = Path(cfg.train.output_dir) / STATE_FILE
    if cfg.train.resume and objective.stateful and state_file.exists():
        objective.load_state_dict(json.loads(state_file.read_text()))
    batches = EpochBatches(examples, cfg.train.batch_size,
                           lambda ex: collate_groups(ex, pad, layout=layout), seed=cfg.train.seed)

    def on_step(step: int, _: dict[str, float]) -> None:
        every = cfg.train.save_every
        # δ and α are trainer state: saved at the checkpoint steps so a resume restores them exactly.
        if objective.stateful and every and (step % every == 0 or step == cfg.train.max_steps) \
                and distributed.is_main():
            atomic_write_text(state_file, json.dumps(objective.state_dict()))

    name = "+".join(plan.weights)
    result = train(model, objective, batches, cfg.train, description=name, on_step=on_step)
    save_final(model, tokenizer, cfg, result.output_dir)
    scores = None
    # FSDP2: every rank gathers the weights, so rank 0 evaluates with no collective
    with sharding.full_weights(model) if held else contextlib.nullcontext():
        if held and distributed.is_main():
            from alignlab.algorithms.preference.heldout import heldout_metrics

            with distributed.local():  # rank 0 alone: nothing here may wait for the other ranks
                scores = heldout_metrics(model, objective, held, pad, layout=layout,
                                         device=device, batch_size=2 * cfg.train.batch_size,
                                         precision=precision)
            atomic_write_text(Path(result.output_dir) / "heldout.json",
                              json.dumps(scores, indent=1))
            print(f"held-out ({len(held)} rows): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return PreferenceRun(result, model, tokenizer, objective, examples, layout, hit, scores)


__all__ = ["LossPlan", "PreferenceConfig", "PreferenceObjective", "PreferenceRun",
           "PreferenceSection", "choose_layout", "load_preference_examples",
           "plan_losses", "run_preference"]
