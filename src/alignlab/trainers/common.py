"""Shared set-up for every trainer: resolve ``world:`` names, load model and data, save."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from alignlab.config import DataSection, ModelSection, WorldSection, dump_config
from alignlab.data.formats import SFT_FORMATS, check_trainer_format
from alignlab.data.loading import RowSet, load_rows, rows_from_list
from alignlab.data.tokenize import TokenizedRows, tokenize_rows
from alignlab.errors import ConfigError
from alignlab.models.loading import LoraSettings, load_model, load_tokenizer
from alignlab.utils.io import atomic_write_text, replace_dir
from alignlab.utils.runtime import seed_everything

WORLD_PREFIX = "world:"


def get_world(world: WorldSection):
    from alignlab.world.build import ensure_world

    return ensure_world(world.preset, world.seed, world.cache_dir)


def resolve_model_path(name_or_path: str, world: WorldSection) -> str:
    """``world:base`` → the built-in world's base model directory (built on first use)."""
    if not name_or_path.startswith(WORLD_PREFIX):
        return name_or_path
    what = name_or_path[len(WORLD_PREFIX):]
    if what != "base":
        raise ConfigError(f"model.name_or_path: unknown world model {what!r}; allowed values: world:base")
    return str(get_world(world).base_dir)


def load_policy(model_cfg: ModelSection, world: WorldSection,
                seed: int | None = None) -> tuple[torch.nn.Module, Any]:
    """The policy and its tokenizer; ``seed`` seeds every RNG first, so randomly initialised
    parts (LoRA adapters) are the same in every run and in a resumed one."""
    path = resolve_model_path(model_cfg.name_or_path, world)
    if seed is not None:
        seed_everything(seed)
    lora = LoraSettings(**model_cfg.lora.model_dump()) if model_cfg.lora else None
    model = load_model(path, dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code,
                       lora=lora, attn_implementation=model_cfg.attn_implementation)
    tokenizer = load_tokenizer(path, trust_remote_code=model_cfg.trust_remote_code)
    return model, tokenizer


def load_data_rows(data: DataSection, world: WorldSection, *, n_default: int = 2048) -> RowSet:
    """Rows from a file/folder/Hub name, or ``world:<task>`` (that task's demonstrations)."""
    if data.source.startswith(WORLD_PREFIX):
        task = get_world(world).task(data.source[len(WORLD_PREFIX):])
        rows = task.demonstrations(data.limit or n_default, seed=world.seed)
        return rows_from_list(rows, format="prompt_completion", source=data.source)
    return load_rows(data.source, format=data.format, split=data.split, limit=data.limit)


def load_training_rows(data: DataSection, world: WorldSection, tokenizer: Any) -> TokenizedRows:
    rows = load_data_rows(data, world)
    check_trainer_format(rows.format, SFT_FORMATS, trainer="sft", source=rows.source)
    tokenized = tokenize_rows(rows, tokenizer, max_length=data.max_length, truncation=data.truncation,
                              completion_only_loss=data.completion_only_loss)
    print(f"data {rows.source}: {tokenized.summary()}")
    if not tokenized.examples:
        raise ConfigError(f"data.source {data.source}: no rows left after truncation policy "
                          f"{data.truncation!r} with max_length {data.max_length}")
    return tokenized


def save_final(model: torch.nn.Module, tokenizer: Any, cfg: BaseModel, output_dir: str | Path) -> Path:
    """Write ``<output_dir>/final`` (model, tokenizer, config) atomically."""
    final = Path(output_dir) / "final"
    tmp = final.with_name(".tmp-final")
    # LoRA: save a merged copy (a plain AutoModelForCausalLM) and leave the trained model as is.
    to_save = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
    to_save.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / "alignlab_config.yaml", dump_config(cfg))
    replace_dir(tmp, final)
    return final
