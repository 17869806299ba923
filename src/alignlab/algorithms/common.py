"""Shared set-up for every trainer: load model and data (``world:`` names included), save."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from alignlab.core.config import (
    DataSection,
    ModelSection,
    RolloutSection,
    WorldSection,
    dump_config,
)
from alignlab.core.errors import ConfigError
from alignlab.core.io import atomic_write_text, replace_dir
from alignlab.core.runtime import seed_everything
from alignlab.data.formats import SFT_FORMATS, check_trainer_format
from alignlab.data.loading import RowSet, load_rows, rows_from_list
from alignlab.data.tokenize import TokenizedRows, tokenize_rows
from alignlab.engine import distributed, sharding
from alignlab.engine.prompts import PromptSource
from alignlab.models.adapters import ADAPTER_DIR, has_adapters, is_quantized, merged, save_adapters
from alignlab.models.loading import load_adapter, load_model, load_tokenizer, model_load_kwargs
from alignlab.world.resolve import is_world, resolve_model_path, world_task


def load_policy(model_cfg: ModelSection, world: WorldSection,
                seed: int | None = None) -> tuple[torch.nn.Module, Any]:
    """The policy and its tokenizer; ``seed`` seeds every RNG first, so randomly initialised
    parts (LoRA adapters) are the same in every run and in a resumed one."""
    path = resolve_model_path(model_cfg.name_or_path, world)
    if seed is not None:
        seed_everything(seed)
    model = load_model(path, dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code,
                       lora=model_cfg.lora, attn_implementation=model_cfg.attn_implementation)
    tokenizer = load_tokenizer(path, trust_remote_code=model_cfg.trust_remote_code)
    return model, tokenizer


def load_data_rows(data: DataSection, world: WorldSection, *, n_default: int = 2048) -> RowSet:
    """Rows from a file/folder/Hub name, or ``world:<task>`` (that task's demonstrations)."""
    if is_world(data.source):
        task = world_task(data.source, world, "data.source")
        rows = task.demonstrations(data.limit or n_default, seed=world.seed)
        return rows_from_list(rows, format="prompt_completion", source=data.source)
    return load_rows(data.source, format=data.format, split=data.split, limit=data.limit)


def load_prompt_source(rollout: RolloutSection, world: WorldSection, seed: int
                       ) -> tuple[PromptSource, Any]:
    """The prompts of online training and the world task they come from (None for a file of
    ``prompt_only`` rows, whose extra columns reach rewards as fields)."""
    src = rollout.prompts
    if is_world(src):
        task = world_task(src, world, "rollout.prompts")
        return PromptSource([{"prompt": p} for p in task.train_prompts], seed), task
    rows = load_rows(src, format="prompt_only")
    return PromptSource([dict(r) for r in rows], seed), None


def render_chat_prompts(source: PromptSource, tokenizer: Any, field: str = "rollout.prompts") -> None:
    """Turn conversational prompts (TRL's ``prompt`` as a list of messages) into the text the
    model continues: the tokenizer's chat template with the generation prompt."""
    chat = [r for r in source.rows if isinstance(r["prompt"], list)]
    if not chat:
        return
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"{field}: conversational prompts (lists of messages) need a "
                          "tokenizer with a chat_template")
    for row in chat:
        row["prompt"] = tokenizer.apply_chat_template(row["prompt"], tokenize=False,
                                                      add_generation_prompt=True)


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
    """Write ``<output_dir>/final`` (model, tokenizer, config) atomically. A LoRA run writes the
    merged model there (a plain ``AutoModelForCausalLM``) and the adapters alone, in PEFT's
    layout with the tokenizer, to ``final/adapter`` (``load_model`` and
    ``PeftModel.from_pretrained`` read it). The merge makes new tensors on the CPU for the
    adapted layers only and leaves the trained model as it is; a QLoRA run's adapters are merged
    into its base reloaded unquantized on the CPU (merging into 4-bit weights would round them
    again). With N processes rank 0 writes it and every rank returns once it is written; a
    model sharded by FSDP2 is written from its full state dict, gathered on every rank."""
    final = Path(output_dir) / "final"
    weights = sharding.full_state_dict(model)
    with distributed.main_first():
        if distributed.is_main():
            _save_final(model, tokenizer, cfg, output_dir, final, weights)
    return final


def _save_final(model: torch.nn.Module, tokenizer: Any, cfg: BaseModel, output_dir: str | Path,
                final: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    tmp = final.with_name(".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    # a model whose save_pretrained writes its own adapters (a scalar-head body merged, the
    # adapters and head in adapter/) is saved as it is
    lora = has_adapters(model) and not getattr(model, "saves_own_adapters", False)
    if lora:
        save_adapters(model, tmp / ADAPTER_DIR)
        tokenizer.save_pretrained(tmp / ADAPTER_DIR)
    if lora and is_quantized(model):
        trust = bool(getattr(getattr(cfg, "model", None), "trust_remote_code", False))
        to_save = load_adapter(tmp / ADAPTER_DIR, model_load_kwargs("auto", trust, None))
    else:
        to_save = merged(model, device="cpu") if lora else model
    to_save.save_pretrained(tmp, **({} if weights is None else {"state_dict": weights}))
    tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / "alignlab_config.yaml", dump_config(cfg))
    replace_dir(tmp, final)
    # Only now is the run finished: a run that died before its final model never looks done.
    atomic_write_text(Path(output_dir) / "DONE", "final\n")
