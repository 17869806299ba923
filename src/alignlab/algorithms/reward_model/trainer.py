"""Reward models: a scalar head on a causal-LM backbone, learned from preferences, rankings or scores.

``r(x, y)`` is the head's value at the last token of prompt + completion. The loss
(``reward.loss``, see :mod:`alignlab.losses.reward`) is Bradley-Terry on pairs (InstructGPT,
Ouyang et al. 2022), with a margin (Llama 2), Plackett-Luce on ranked lists, or MSE on scores,
plus optional reward centering ``η·(r_c + r_r)²`` (Eisenstein et al. 2023). An ensemble of K
columns (``num_heads`` heads × ``members`` models, each column trained on its own random
``subsample`` of the data, members with their own seeds) mitigates over-optimisation (Coste et
al. 2024). Held-out pairwise accuracy, ECE and reward statistics are written to
``<output_dir>/eval/metrics.jsonl`` (and TensorBoard) and ``<output_dir>/reward_eval.json``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from alignlab.algorithms.reward_model.batches import collate, example_rewards
from alignlab.core.config import (
    DataSection,
    ModelSection,
    Section,
    TrainSection,
    WorldSection,
    dump_config,
)
from alignlab.core.errors import ConfigError
from alignlab.core.io import atomic_write_json, atomic_write_text, replace_dir
from alignlab.data.batches import EpochBatches
from alignlab.engine import distributed, sharding
from alignlab.engine.loop import LossOutput, TrainResult, train
from alignlab.engine.metrics import MetricsLogger
from alignlab.engine.run import prepare_run
from alignlab.losses.reward import REWARD_MODEL_LOSSES, centering_penalty, loss_format
from alignlab.models.adapters import ADAPTER_DIR


class EnsembleSection(Section):
    num_heads: int = Field(1, ge=1)
    """Heads on one shared backbone."""
    members: int = Field(1, ge=1)
    """Separately trained models (seeds ``train.seed + i``), saved as ``final/member_i``."""
    subsample: float = Field(1.0, gt=0, le=1)
    """Fraction of the training examples each column (head of a member) learns from."""
    aggregate: Literal["mean", "min", "mean_minus_std"] = "mean"
    std_coef: float = Field(1.0, ge=0)
    """λ of ``mean_minus_std``."""


class RewardSection(Section):
    loss: str = "bradley_terry"
    center_coef: float = Field(0.0, ge=0)
    """η of the centering term ``η·(Σ_items r)²`` (0 = off)."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    eval_every: int | None = Field(None, gt=0)
    """Also evaluate every this many steps (always at the end)."""
    eval_batch_size: int = Field(64, gt=0)
    ece_bins: int = Field(10, gt=0)
    score_column: str = "score"
    """The numeric column ``mse`` regresses on (prompt/completion rows)."""
    ensemble: EnsembleSection = EnsembleSection()

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value not in REWARD_MODEL_LOSSES:
            raise ValueError(f"unknown reward-model loss {value!r}; allowed values: "
                             f"{', '.join(REWARD_MODEL_LOSSES.names())}")
        return value


class RewardConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp, ensembles too (engine/sharding.py)

    model: ModelSection = ModelSection()
    data: DataSection = DataSection(source="world:positive", limit=2048)
    train: TrainSection = TrainSection(output_dir="runs/reward", lr=1e-4, max_steps=200)
    world: WorldSection = WorldSection()
    reward: RewardSection = RewardSection()


# ---- data ----------------------------------------------------------------------------------------

def contrast_pairs(task: Any, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` oracle preference rows on a review task (an all-positive and an all-negative
    completion of one prefix, :func:`world_preference_rows`), ordered by the task's gold reward,
    with ``margin`` = the gold gap."""
    from alignlab.world.preference_rows import world_preference_rows

    rows = world_preference_rows(task, "preference", n, seed=seed)
    golds = task.gold([r["prompt"] for r in rows for _ in (0, 1)],
                      [c for r in rows for c in (r["chosen"], r["rejected"])])
    out = []
    for r, ga, gb in zip(rows, golds[::2], golds[1::2]):
        chosen, rejected = (r["chosen"], r["rejected"]) if ga >= gb else (r["rejected"], r["chosen"])
        out.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected, "margin": abs(ga - gb)})
    return out


def _check_scores(rows: Any, column: str) -> None:
    for i, row in enumerate(rows.rows):
        value = row.get(column)
        if value is None:
            raise rows.error(i, "is missing (reward.loss 'mse' regresses on it; set "
                             "reward.score_column)", column)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise rows.error(i, f"must be a finite number, got {value!r:.40}", column)


def load_reward_rows(data: DataSection, world: WorldSection) -> Any:
    """The rows of ``data.source`` (a ``RowSet``): a file, folder or Hub dataset, or for
    ``world:<task>`` that task's oracle contrast pairs ordered by gold (:func:`contrast_pairs`;
    ``data.limit`` of them, default 2048). Shared with the preference-model trainer."""
    from alignlab.data.loading import load_rows, rows_from_list
    from alignlab.world.resolve import is_world, world_task

    if is_world(data.source):
        task = world_task(data.source, world, "data.source")
        return rows_from_list(contrast_pairs(task, data.limit or 2048, world.seed),
                              format="preference", source=data.source)
    return load_rows(data.source, format=data.format, split=data.split, limit=data.limit)


def without_ties(rows: Any) -> Any:
    """``rows`` less the preference rows marked ``tie: true`` (logged when there are any)."""
    from alignlab.data.loading import RowSet

    tied = [i for i, r in enumerate(rows.rows) if rows.format == "preference" and r.get("tie") is True]
    if not tied:
        return rows
    kept = sorted(set(range(len(rows))) - set(tied))
    print(f"data {rows.source}: {len(tied)} tied pairs skipped")
    return RowSet(rows.format, [rows.rows[i] for i in kept], rows.source,
                  [rows.where(i)[1] for i in kept], rows.position_kind)


def load_examples(cfg: RewardConfig, tokenizer: Any) -> tuple[list[dict], int, str]:
    """Tokenised examples for the loss's row format, the pad id, and that format."""
    from alignlab.data.tokenize import tokenize_rows

    fmt = REWARD_MODEL_LOSSES.get(cfg.reward.loss).data_format
    data = cfg.data
    # Bradley-Terry has no tie outcome: a tied pair carries no order to learn
    rows = without_ties(load_reward_rows(data, cfg.world))
    # A pair is a ranked list of two, so the listwise loss also learns from preference rows.
    if rows.format != fmt and not (fmt == "ranked" and rows.format == "preference"):
        raise ConfigError(f"data.source {data.source}: rows have format '{rows.format}' but "
                          f"reward.loss '{cfg.reward.loss}' learns from '{fmt}' rows")
    keep: tuple[str, ...] = ()
    if fmt == "prompt_completion":
        _check_scores(rows, cfg.reward.score_column)
        keep = (cfg.reward.score_column,)
    tokenized = tokenize_rows(rows, tokenizer, max_length=data.max_length,
                              truncation=data.truncation, keep_columns=keep)
    print(f"data {rows.source}: {tokenized.summary()}")
    examples = tokenized.examples
    if fmt == "ranked" and rows.format == "preference":
        examples = [{"prompt_ids": e["prompt_ids"], "completion_ids": [e["chosen_ids"], e["rejected_ids"]],
                     "scores": [1.0, 0.0]} for e in examples]
    if fmt == "prompt_completion":
        examples = [{"input_ids": e["input_ids"], "loss_mask": e["loss_mask"],
                     "target": float(e[cfg.reward.score_column])} for e in examples]
    if len(examples) < 2:
        raise ConfigError(f"data.source {data.source}: {len(examples)} rows left after "
                          f"truncation policy {data.truncation!r}; a reward model needs more")
    return examples, tokenized.pad_token_id, fmt


def held_out_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of ``n`` examples: a ``seed`` shuffle, the first
    ⌈fraction·n⌉ held out. Shared with the preference-model trainer."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = math.ceil(fraction * n) if fraction else 0
    return order[n_eval:], order[:n_eval]


def split_examples(examples: list[dict], cfg: RewardConfig) -> tuple[list[dict], list[dict]]:
    """Held-out eval examples, and train examples each with a 0/1 ``member_mask`` per column."""
    train_idx, eval_idx = held_out_split(len(examples), cfg.reward.eval_fraction, cfg.train.seed)
    evals = [examples[i] for i in eval_idx]
    ens = cfg.reward.ensemble
    k = ens.members * ens.num_heads
    rng = random.Random(cfg.train.seed + 1)
    trains = [{**examples[i], "member_mask": [float(rng.random() < ens.subsample) for _ in range(k)]}
              for i in train_idx]
    return trains, evals


# ---- objective -----------------------------------------------------------------------------------

class RewardObjective:
    """Σ over examples (and mean over ensemble columns) of the reward-model loss; ``num_items``
    counts each example once per column that learns from it, averaged over columns."""

    def __init__(self, loss: str, center_coef: float = 0.0) -> None:
        self.fn = REWARD_MODEL_LOSSES.get(loss)
        self.fmt, self.center_coef = self.fn.data_format, center_coef

    def num_items(self, batch: dict[str, Any]) -> float:
        mask = batch["member_mask"]
        return float(mask.sum()) / mask.shape[1]

    def per_example(self, rewards: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """``[S, H]`` sequence rewards → ``[B, H]`` losses (centering included)."""
        items = example_rewards(rewards, batch, self.fmt)
        heads = range(items.shape[-1])
        if self.fmt == "preference":
            kwargs = {}
            if self.fn.uses_margin:
                margin = batch.get("margin")
                kwargs["margin"] = None if margin is None else margin[:, None]
            losses = self.fn(items[:, 0], items[:, 1], **kwargs)
        elif self.fmt == "ranked":
            losses = torch.stack([self.fn(items[..., h], batch["scores"], batch["item_mask"])
                                  for h in heads], dim=-1)
        else:
            losses = self.fn(items[:, 0], batch["target"][:, None])
        if self.center_coef and self.fmt != "prompt_completion":
            mask = batch.get("item_mask")
            losses = losses + torch.stack([centering_penalty(items[..., h], mask, self.center_coef)
                                           for h in heads], dim=-1)
        return losses

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        rewards = model.sequence_values(batch)
        rewards = rewards[:, None] if rewards.ndim == 1 else rewards
        losses = self.per_example(rewards, batch)
        weights = batch["member_mask"].to(losses.dtype)
        metrics: dict[str, float] = {}
        if self.fmt == "preference":
            half = rewards.shape[0] // 2
            with torch.no_grad():
                metrics = {"accuracy": float((rewards[:half] > rewards[half:]).float().mean()),
                           "chosen_reward": float(rewards[:half].mean()),
                           "rejected_reward": float(rewards[half:].mean())}
        return LossOutput((losses * weights).sum() / weights.shape[1], metrics)


# ---- run -----------------------------------------------------------------------------------------

def init_model(path: str, cfg: RewardConfig, seed: int) -> torch.nn.Module:
    """A fresh head on a causal LM, or a reward model (scalar-head or *ForSequenceClassification)
    to keep training; with ``model.lora`` LoRA adapters on its body and the head trained whole."""
    from transformers import AutoConfig

    from alignlab.core.runtime import seed_everything
    from alignlab.models.heads import HEAD_CONFIG, CausalLMWithScalarHead, load_reward_model
    from alignlab.models.loading import from_pretrained_checked

    m = cfg.model
    seed_everything(seed)  # before any model is built; the head's init differs per member
    config = None if (Path(path) / HEAD_CONFIG).is_file() else from_pretrained_checked(
        AutoConfig, path, trust_remote_code=m.trust_remote_code)
    archs = list(getattr(config, "architectures", None) or [])
    if config is None or any(a.endswith("ForSequenceClassification") for a in archs):
        model = load_reward_model(path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                                  attn_implementation=m.attn_implementation, trainable=True)
        if model.num_heads != cfg.reward.ensemble.num_heads:
            raise ConfigError(f"reward.ensemble.num_heads is {cfg.reward.ensemble.num_heads} but "
                              f"the reward model at {path} has {model.num_heads} heads")
        if m.lora is not None and m.lora.quantize is not None:
            raise ConfigError("field 'model.lora.quantize': QLoRA starts from a causal LM; "
                              f"'{path}' is a reward model (train it with LoRA unquantized)")
        return model if m.lora is None else model.add_lora(m.lora)
    # Comparisons are blind to a constant shift: a bias is learnt only from score regression or
    # centering. Without one, AutoModelForSequenceClassification scores the saved model exactly.
    bias = loss_format(cfg.reward.loss) == "prompt_completion" or cfg.reward.center_coef > 0
    return CausalLMWithScalarHead.from_causal_lm(
        path, num_heads=cfg.reward.ensemble.num_heads, bias=bias, dtype=m.dtype,
        trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation,
        lora=m.lora)


def save_reward_model(ensemble: Any, tokenizer: Any, cfg: RewardConfig, output_dir: str | Path) -> Path:
    """Write ``<output_dir>/final`` (ensemble, tokenizer in it and every member, config)
    atomically; with N processes rank 0 writes and every rank returns once it is written."""
    final = Path(output_dir) / "final"
    # FSDP2: each member's full state dict, gathered on every rank (None for a plain member)
    states = [sharding.full_state_dict(m) for m in ensemble.members]
    with distributed.main_first():
        if distributed.is_main():
            _save_reward_model(ensemble, tokenizer, cfg, output_dir, final, states)
    return final


def _save_reward_model(ensemble: Any, tokenizer: Any, cfg: RewardConfig, output_dir: str | Path,
                       final: Path, states: list) -> None:
    tmp = final.with_name(".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    ensemble.save_pretrained(tmp, pad_token_id=tokenizer.pad_token_id, state_dicts=states)
    for d in [tmp, *sorted(tmp.glob("member_*"))]:
        for where in (d, d / ADAPTER_DIR):  # a LoRA member's adapters loaded alone need it too
            if where.is_dir():
                tokenizer.save_pretrained(where)
    atomic_write_text(tmp / "alignlab_config.yaml", dump_config(cfg))
    replace_dir(tmp, final)
    atomic_write_text(Path(output_dir) / "DONE", "final\n")


@dataclass
class RewardRun:
    result: TrainResult  # the whole run (members' histories concatenated, seconds summed)
    results: list[TrainResult]  # one per ensemble member
    model: Any  # a RewardEnsemble
    tokenizer: Any
    metrics: dict[str, float]
    final_dir: Path


def run_reward(cfg: RewardConfig) -> RewardRun:
    """Load, train every ensemble member, evaluate on the held-out split, save ``final``."""
    prepare_run(cfg)  # before anything slow is loaded
    from alignlab.algorithms.reward_model.evaluate import evaluate_reward_model as evaluate_rewards
    from alignlab.models.loading import load_tokenizer
    from alignlab.rewards.reward_model import RewardEnsemble
    from alignlab.world.resolve import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path, cfg.world)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    examples, pad_id, fmt = load_examples(cfg, tokenizer)
    train_ex, eval_ex = split_examples(examples, cfg)
    out, ens, rc = Path(cfg.train.output_dir), cfg.reward.ensemble, cfg.reward
    evaluate = functools.partial(evaluate_rewards, examples=eval_ex, fmt=fmt, pad_token_id=pad_id,
                                 batch_size=rc.eval_batch_size, n_bins=rc.ece_bins)
    # With N processes rank 0 evaluates (on the whole held-out split) and writes the reports;
    # under FSDP2 inside full_weights, which every rank enters (``gathered``).
    main = distributed.is_main()
    eval_log = (MetricsLogger(out / "eval", tensorboard=cfg.train.tensorboard)
                if eval_ex and main else None)
    objective = RewardObjective(rc.loss, rc.center_coef)
    models, results = [], []
    try:
        for i in range(ens.members):
            seed = cfg.train.seed + i
            train_cfg = cfg.train if ens.members == 1 else cfg.train.model_copy(
                update={"output_dir": str(out / f"member_{i}"), "seed": seed})
            model = init_model(path, cfg, seed)
            columns = list(range(i * ens.num_heads, (i + 1) * ens.num_heads))
            batches = EpochBatches(train_ex, cfg.train.batch_size, functools.partial(
                collate, fmt=fmt, pad_token_id=pad_id, packed=cfg.data.packing, columns=columns),
                seed=seed)
            on_step = None
            if eval_ex and rc.eval_every:
                def on_step(step: int, _: dict, model=model, i=i) -> None:
                    if step % rc.eval_every == 0:
                        with gathered([model]):
                            if eval_log is not None:
                                one = RewardEnsemble([model], ens.aggregate, ens.std_coef)
                                eval_log.log(step, {"member": i, **evaluate(one)})
            results.append(train(model, objective, batches, train_cfg, on_step=on_step,
                                 description="reward" if ens.members == 1 else f"reward member {i}"))
            models.append(model)
        ensemble = RewardEnsemble(models, ens.aggregate, ens.std_coef)
        with gathered(models if eval_ex else []):
            metrics = evaluate(ensemble) if eval_ex and main else {}
        if eval_log is not None:
            eval_log.log(results[-1].step, {"final": 1, **metrics})
    finally:
        if eval_log is not None:
            eval_log.close()
    if main:
        atomic_write_json(out / "reward_eval.json", {
            "loss": rc.loss, "ensemble_size": ensemble.size, "aggregate": ens.aggregate,
            "eval_examples": len(eval_ex), "metrics": metrics})
    final = save_reward_model(ensemble, tokenizer, cfg, out)
    if metrics:
        print("reward eval: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in ("accuracy", "ece")
                                          if k in metrics))
    whole = TrainResult(results[-1].step, [h for r in results for h in r.history], out,
                        sum(r.seconds for r in results))
    return RewardRun(whole, results, ensemble, tokenizer, metrics, final)


@contextlib.contextmanager
def gathered(models: list[torch.nn.Module]) -> Any:
    """Every weight of ``models`` (sharded by FSDP2 or not) on every rank, and rank 0 running
    alone: the block may run forwards on rank 0 only. Every rank must enter."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(sharding.full_weights(model))
        with distributed.local() if distributed.is_main() else contextlib.nullcontext():
            yield


def _register() -> None:
    from alignlab.algorithms.registry import ALGORITHMS, AlgorithmEntry

    ALGORITHMS.register("reward")(AlgorithmEntry(
        RewardConfig, run_reward,
        "Reward model (scalar head): Bradley-Terry, margin, Plackett-Luce or MSE; ensembles."))


_register()
