"""A general pairwise preference model (``alignlab train preference_model``): ``P(a ≻ b | x)``
from one pass over the prompt and both responses, which can represent non-transitive
preferences (Munos et al. 2023, "Nash Learning from Human Feedback"; Dong et al. 2024, "RLHF
Workflow: From Reward Modeling to Online RLHF"; the model: ``rewards/preference_model.py``).

1. Data: the preference rows the reward trainer reads (``reward_model.trainer.load_reward_rows``:
   a file, folder or Hub dataset — e.g. the simulated annotator's labels written by ``alignlab
   data preferences`` — or ``world:<task>``'s oracle pairs). Each row is joined in both orders,
   (x, chosen, rejected) with label 1 and (x, rejected, chosen) with label 0; a ``tie: true``
   row is label ½ in both (``preference_model.ties: half``) or skipped (``skip``).
   ``data.max_length`` limits the joined sequence; ``data.truncation`` cuts it
   (``keep_end_of_prompt``, ``truncate_completion``) or drops the pair (``drop``; the saved
   model then cuts what it judges with ``keep_end_of_prompt``).
2. Split: the reward trainer's held-out split (``eval_fraction``, seeded by ``train.seed``).
3. Loss: ``losses.reward.preference_model_bce`` summed over both orders; the loop divides by
   the number of ordered pairs. Logged: ``accuracy`` (an order counts when σ(s) falls on its
   label's side, a tie label ½) and ``position_bias``.
4. Held-out metrics (``algorithms/preference_model/evaluate.py``) every ``eval_every`` steps and
   at the end, to ``<output_dir>/eval/metrics.jsonl`` and ``preference_model_eval.json``; the
   model, tokenizer and config to ``<output_dir>/final`` (safetensors).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from alignlab.algorithms.common import save_final
from alignlab.algorithms.preference_model.evaluate import evaluate_preference_model
from alignlab.algorithms.registry import ALGORITHMS, AlgorithmEntry
from alignlab.algorithms.reward_model.trainer import (
    gathered,
    held_out_split,
    load_reward_rows,
    without_ties,
)
from alignlab.core.config import DataSection, ModelSection, Section, TrainSection, WorldSection
from alignlab.core.errors import ConfigError
from alignlab.core.io import atomic_write_json
from alignlab.data.batches import EpochBatches
from alignlab.data.collate import pack_collate, pad_collate
from alignlab.engine import distributed
from alignlab.engine.loop import LossOutput, TrainResult, train
from alignlab.engine.metrics import MetricsLogger
from alignlab.engine.run import prepare_run
from alignlab.losses.reward import preference_model_bce
from alignlab.rewards.preference_model import (
    PairEncoder,
    PairFormat,
    PairwisePreferenceModel,
    is_preference_model,
    swap_average,
)


class PreferenceModelSection(Section):
    a_marker: str = Field("\n[A]", min_length=1)
    """Text between the prompt and the response shown first."""
    b_marker: str = Field("\n[B]", min_length=1)
    """Text between the first and the second response."""
    ties: Literal["half", "skip"] = "half"
    """Rows marked ``tie: true``: label ½ in both orders, or left out."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    eval_every: int | None = Field(None, gt=0)
    """Also evaluate every this many steps (always at the end)."""
    eval_batch_size: int = Field(64, gt=0)

    @model_validator(mode="after")
    def _markers_differ(self) -> PreferenceModelSection:
        if self.a_marker == self.b_marker:
            raise ValueError("preference_model.a_marker and preference_model.b_marker must "
                             f"differ (both {self.a_marker!r}): they tell the responses apart")
        return self


class PreferenceModelConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp, zero1/2/3 (engine/sharding.py)

    model: ModelSection = ModelSection()
    data: DataSection = DataSection(source="world:positive", limit=2048)
    train: TrainSection = TrainSection(output_dir="runs/preference_model", lr=1e-4, max_steps=200)
    world: WorldSection = WorldSection()
    preference_model: PreferenceModelSection = PreferenceModelSection()


def pair_format(cfg: PreferenceModelConfig) -> PairFormat:
    """The saved model's pair format: markers, ``data.max_length`` and the cut it judges with."""
    truncation = "keep_end_of_prompt" if cfg.data.truncation == "drop" else cfg.data.truncation
    return PairFormat(a_marker=cfg.preference_model.a_marker,
                      b_marker=cfg.preference_model.b_marker,
                      max_length=cfg.data.max_length, truncation=truncation)


# ---- data ----------------------------------------------------------------------------------------

def load_pair_examples(cfg: PreferenceModelConfig, tokenizer: Any, encoder: PairEncoder
                       ) -> tuple[list[dict[str, Any]], int]:
    """Joined examples ``{"ab", "ba", "target"}`` (``ab``: chosen shown first; ``target``: 1, or
    ½ for a tie) and the pad id."""
    from alignlab.data.tokenize import tokenize_rows

    data = cfg.data
    rows = load_reward_rows(data, cfg.world)
    if rows.format != "preference":
        raise ConfigError(f"data.source {data.source}: rows have format '{rows.format}'; a "
                          "preference model learns from 'preference' rows (prompt, chosen, "
                          "rejected)")
    if cfg.preference_model.ties == "skip":
        rows = without_ties(rows)
    tokenized = tokenize_rows(rows, tokenizer, max_length=None)
    examples, truncated, dropped = [], 0, 0
    for e in tokenized.examples:
        fits = encoder.fits(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"])
        orders = (None if not fits and data.truncation == "drop" else
                  encoder.both_orders(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]))
        if orders is None:
            dropped += 1
            continue
        truncated += not fits
        examples.append({"ab": orders[0], "ba": orders[1],
                         "target": 0.5 if e.get("tie") is True else 1.0})
    ties = sum(e["target"] == 0.5 for e in examples)
    print(f"data {rows.source}: {len(examples)} pairs kept ({truncated} cut to data.max_length "
          f"{data.max_length}, {ties} ties), {dropped} dropped")
    if len(examples) < 2:
        raise ConfigError(f"data.source {data.source}: {len(examples)} pairs left after "
                          f"data.truncation {data.truncation!r}; a preference model needs more")
    return examples, tokenized.pad_token_id


def collate_pairs(examples: list[dict[str, Any]], pad_token_id: int, packed: bool = False
                  ) -> dict[str, Any]:
    """``2B`` sequences, the ``B`` chosen-first then the ``B`` rejected-first, and ``target``
    ``[2B]`` (t, then 1 − t)."""
    sequences = [e["ab"] for e in examples] + [e["ba"] for e in examples]
    batch = pack_collate(sequences) if packed else pad_collate(sequences, pad_token_id)
    t = torch.tensor([float(e["target"]) for e in examples])
    batch["target"] = torch.cat([t, 1 - t])
    return batch


# ---- objective -----------------------------------------------------------------------------------

class PreferenceModelObjective:
    """Σ of ``preference_model_bce`` over the ordered pairs; ``num_items`` counts them."""

    def num_items(self, batch: dict[str, Any]) -> float:
        return float(batch["target"].numel())

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        logits = model(batch)  # the forward: sharded weights are gathered in it
        target = batch["target"].to(logits.device)
        losses = preference_model_bce(logits, target)
        with torch.no_grad():
            p, half = torch.sigmoid(logits.float()), len(target) // 2
            right = torch.where(target == 0.5, 0.5, ((p > 0.5) == (target > 0.5)).float())
            metrics = {"accuracy": float(right.mean()),
                       "position_bias": float(((p[:half] + p[half:]) / 2 - 0.5).mean()),
                       "p_chosen_mean": float(swap_average(p[:half], p[half:]).mean())}
        return LossOutput(losses.sum(), metrics)


# ---- run -----------------------------------------------------------------------------------------

def init_model(path: str, cfg: PreferenceModelConfig, fmt: PairFormat) -> PairwisePreferenceModel:
    """A fresh head on a causal LM, or a saved preference model (same markers) to keep training."""
    from alignlab.core.runtime import seed_everything

    m = cfg.model
    if m.lora is not None and m.lora.quantize is not None:
        raise ConfigError("field 'model.lora.quantize': QLoRA starts from a causal LM; the "
                          "preference model trains LoRA on its body in full precision")
    seed_everything(cfg.train.seed)  # before the head is initialised
    kwargs = {"dtype": m.dtype, "trust_remote_code": m.trust_remote_code,
              "attn_implementation": m.attn_implementation}
    if not is_preference_model(path):
        model = PairwisePreferenceModel.from_causal_lm(path, fmt, **kwargs)
        if m.lora is not None:  # adapters on the body, the head trained whole
            model.scorer.add_lora(m.lora)
        return model
    model = PairwisePreferenceModel.from_pretrained(path, **kwargs)
    if m.lora is not None:
        model.scorer.add_lora(m.lora)
    if (model.format.a_marker, model.format.b_marker) != (fmt.a_marker, fmt.b_marker):
        raise ConfigError(f"model.name_or_path {path} is a preference model with markers "
                          f"{model.format.a_marker!r}, {model.format.b_marker!r}; set "
                          "preference_model.a_marker and b_marker to them")
    model.format = fmt
    return model


@dataclass
class PreferenceModelRun:
    result: TrainResult
    model: PairwisePreferenceModel
    tokenizer: Any
    metrics: dict[str, float]
    final_dir: Path


def run_preference_model(cfg: PreferenceModelConfig) -> PreferenceModelRun:
    """Load, train, evaluate on the held-out split, save ``final``."""
    prepare_run(cfg)  # before anything slow is loaded
    from alignlab.models.loading import load_tokenizer
    from alignlab.world.resolve import resolve_model_path

    section, out = cfg.preference_model, Path(cfg.train.output_dir)
    path = resolve_model_path(cfg.model.name_or_path, cfg.world)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    fmt = pair_format(cfg)
    examples, pad_id = load_pair_examples(cfg, tokenizer, PairEncoder(tokenizer, fmt))
    train_idx, eval_idx = held_out_split(len(examples), section.eval_fraction, cfg.train.seed)
    held_out = [examples[i] for i in eval_idx]
    evaluate = functools.partial(evaluate_preference_model, examples=held_out,
                                 pad_token_id=pad_id, batch_size=section.eval_batch_size)
    model = init_model(path, cfg, fmt)
    batches = EpochBatches([examples[i] for i in train_idx], cfg.train.batch_size,
                           functools.partial(collate_pairs, pad_token_id=pad_id,
                                             packed=cfg.data.packing), seed=cfg.train.seed)
    # With N processes rank 0 evaluates (on the whole held-out split) and writes the reports;
    # a sharded model's weights are gathered for it on every rank (``gathered``).
    main = distributed.is_main()
    eval_log = (MetricsLogger(out / "eval", tensorboard=cfg.train.tensorboard)
                if held_out and main else None)

    def evaluated() -> dict[str, float]:
        with gathered([model]):
            return evaluate(model) if held_out and main else {}

    on_step = None
    if held_out and section.eval_every:
        def on_step(step: int, _: dict) -> None:
            if step % section.eval_every == 0:
                metrics = evaluated()
                if eval_log is not None:
                    eval_log.log(step, metrics)
    try:
        result = train(model, PreferenceModelObjective(), batches, cfg.train, on_step=on_step,
                       description="preference model")
        metrics = evaluated()
        if eval_log is not None:
            eval_log.log(result.step, {"final": 1, **metrics})
    finally:
        if eval_log is not None:
            eval_log.close()
    if main:
        atomic_write_json(out / "preference_model_eval.json",
                          {"eval_examples": len(held_out), "metrics": metrics})
    final = save_final(model, tokenizer, cfg, out)
    if "accuracy" in metrics:
        print(f"preference model eval: accuracy {metrics['accuracy']:.3f}, "
              f"log_loss {metrics['log_loss']:.3f}")
    return PreferenceModelRun(result, model, tokenizer, metrics, final)


ALGORITHMS.register("preference_model")(AlgorithmEntry(
    PreferenceModelConfig, run_preference_model,
    "General pairwise preference model: P(a ≻ b | x) from the prompt and both responses, "
    "binary cross-entropy on both orders; non-transitive preferences (NLHF, RLHF Workflow)."))
