"""Supervised fine-tuning: maximise the log-likelihood of demonstrations.

``L = −Σ_t m_t · log π(y_t | y_<t) / Σ_t m_t`` over the trained tokens (``loss_mask`` m):
completion-only or full-sequence, padded or padding-free packed batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from alignlab.core.config import (
    DataSection,
    EvalSection,
    ModelSection,
    Section,
    TrainSection,
    WorldSection,
)
from alignlab.data.batches import make_batches
from alignlab.engine.loop import TrainResult, train
from alignlab.engine.objectives import NLLObjective
from alignlab.engine.run import prepare_run


class SFTConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp (engine/sharding.py)
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection(output_dir="runs/sft", lr=1e-4, max_steps=100)
    world: WorldSection = WorldSection()
    eval: EvalSection | None = None


@dataclass
class SFTRun:
    result: TrainResult
    model: torch.nn.Module
    tokenizer: Any


def run_sft(cfg: SFTConfig) -> SFTRun:
    """Load model and data as the config says, train, and save the final model."""
    prepare_run(cfg)  # before anything slow is loaded
    from alignlab.algorithms.common import load_policy, load_training_rows, save_final

    model, tokenizer = load_policy(cfg.model, cfg.world, seed=cfg.train.seed)
    tokenized = load_training_rows(cfg.data, cfg.world, tokenizer)
    batches = make_batches(tokenized.examples, tokenized.pad_token_id, cfg.data, cfg.train)
    result = train(model, NLLObjective(), batches, cfg.train, description="sft")
    save_final(model, tokenizer, cfg, result.output_dir)
    return SFTRun(result, model, tokenizer)


def _register() -> None:
    from alignlab.algorithms.registry import ALGORITHMS, AlgorithmEntry

    ALGORITHMS.register("sft")(AlgorithmEntry(
        SFTConfig, run_sft, "Supervised fine-tuning on demonstrations (completion-only or full-sequence, packing)."))


_register()
