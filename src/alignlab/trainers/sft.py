"""Supervised fine-tuning: maximise the log-likelihood of demonstrations.

``L = −Σ_t m_t · log π(y_t | y_<t) / Σ_t m_t`` over the trained tokens (``loss_mask`` m):
completion-only or full-sequence, padded or padding-free packed batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from alignlab.config import DataSection, EvalSection, ModelSection, Section, TrainSection, WorldSection
from alignlab.data.collate import pack_collate, pad_collate
from alignlab.models.logprobs import token_logprobs
from alignlab.trainers.batches import EpochBatches
from alignlab.trainers.loop import LossOutput, TrainResult, train


class SFTObjective:
    """Token-level negative log-likelihood; ``num_items`` is the number of trained tokens."""

    def num_items(self, batch: dict[str, Any]) -> float:
        return float(batch["loss_mask"].sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        lp = token_logprobs(model, batch)
        nll = -lp.sum()
        return LossOutput(nll, {"nll_per_token": nll.item() / max(float(batch["loss_mask"].sum()), 1.0)})


class SFTConfig(Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection(output_dir="runs/sft", lr=1e-4, max_steps=100)
    world: WorldSection = WorldSection()
    eval: EvalSection | None = None


def make_batches(examples: list[dict[str, Any]], pad_token_id: int, data: DataSection,
                 train_cfg: TrainSection) -> EpochBatches:
    """Micro-batches of ``train.batch_size`` examples, padded or packed padding-free."""
    collate = pack_collate if data.packing else (lambda ex: pad_collate(ex, pad_token_id))
    return EpochBatches(examples, train_cfg.batch_size, collate, seed=train_cfg.seed)


@dataclass
class SFTRun:
    result: TrainResult
    model: torch.nn.Module
    tokenizer: Any


def run_sft(cfg: SFTConfig) -> SFTRun:
    """Load model and data as the config says, train, and save the final model."""
    from alignlab.trainers.common import load_policy, load_training_rows, save_final

    model, tokenizer = load_policy(cfg.model, cfg.world, seed=cfg.train.seed)
    tokenized = load_training_rows(cfg.data, cfg.world, tokenizer)
    batches = make_batches(tokenized.examples, tokenized.pad_token_id, cfg.data, cfg.train)
    result = train(model, SFTObjective(), batches, cfg.train, description="sft")
    save_final(model, tokenizer, cfg, result.output_dir)
    return SFTRun(result, model, tokenizer)


def _register() -> None:
    from alignlab.trainers.registry import ALGORITHMS, AlgorithmEntry

    ALGORITHMS.register("sft")(AlgorithmEntry(
        SFTConfig, run_sft, "Supervised fine-tuning on demonstrations (completion-only or full-sequence, packing)."))


_register()
