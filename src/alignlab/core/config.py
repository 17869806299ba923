"""Typed configs: YAML files plus ``--set a.b=c`` overrides, validated by pydantic.

Every section forbids unknown keys, and every validation problem is reported as
``<file>: field 'a.b': <problem>`` with the allowed values or fields, never as a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignlab.core.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(Section):
    """LoRA adapter (Hu et al. 2021, "LoRA"): ``W + (alpha / r) B A`` on ``target_modules``.

    ``target_modules="all-linear"`` is PEFT's shorthand for every linear layer except the output
    embedding (which keeps ``token_logprobs`` on its chunked path)."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None


class ModelSection(Section):
    name_or_path: str = "world:base"
    """A Hub name, a local directory, or ``world:base`` for the built-in world's base model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    lora: LoraSettings | None = None


class DataSection(Section):
    source: str = "world:positive"
    """A JSONL/Parquet file, a ``datasets`` folder, a Hub dataset name, or ``world:<task>``
    (the task's demonstrations)."""
    format: str | None = None
    split: str = "train"
    limit: int | None = Field(None, gt=0)
    max_length: int = Field(256, gt=1)
    truncation: Literal["keep_end_of_prompt", "truncate_completion", "drop"] = "keep_end_of_prompt"
    packing: bool = False
    completion_only_loss: bool = True


class WorldSection(Section):
    preset: Literal["full", "tiny"] = "full"
    seed: int = 0
    cache_dir: str | None = None
    """Defaults to ``$ALIGNLAB_CACHE`` or ``~/.cache/alignlab``."""


class TrainSection(Section):
    output_dir: str = "runs/sft"
    seed: int = 0
    max_steps: int = Field(100, gt=0)
    batch_size: int = Field(16, gt=0)
    """Micro-batch size (examples per forward pass)."""
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(None, gt=0)
    save_total_limit: int = Field(2, gt=0)
    resume: bool = False
    """Resume from the newest checkpoint in ``output_dir`` when one exists."""
    overwrite: bool = False
    """Replace an earlier run in ``output_dir`` (its checkpoints, metrics, final model, DONE);
    without it (or ``resume``) a non-empty run directory is refused."""
    tensorboard: bool = True
    progress: bool = True
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in backward: less activation memory for about a third more
    compute; turn it on only when memory needs it."""


class RolloutSection(Section):
    prompts: str = "world:positive"
    """``world:<task>`` (the task's train prompts) or a JSONL/Parquet file of ``prompt_only`` rows
    (extra columns are passed to reward functions as fields)."""
    prompts_per_step: int = Field(8, gt=0)
    n: int = Field(4, gt=0)
    """Completions per prompt (the group size)."""
    max_new_tokens: int | None = Field(None, gt=0)
    """Defaults to the world task's suggestion, else 64."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(64, gt=0)


class OnlineTrainSection(TrainSection):
    """``TrainSection`` with online-training defaults; ``max_steps`` counts iterations (one
    rollout batch each), and the LR schedule advances once per iteration."""

    output_dir: str = "runs/online"
    max_steps: int = Field(100, gt=0)
    lr: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    log_every: int = Field(1, gt=0)


class EvalSection(Section):
    task: str = "positive"
    n_prompts: int = Field(64, gt=0)
    samples_per_prompt: int = Field(1, gt=0)
    max_new_tokens: int | None = Field(None, gt=0)
    """Defaults to the task's own suggestion."""
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(64, gt=0)
    seed: int = 1234


C = TypeVar("C", bound=BaseModel)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides; values are parsed as YAML (``1e-4``, ``true``, ``[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set has an empty key in {item!r}")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_override(raw)
    return data


def _parse_override(raw: str) -> Any:
    """A ``--set`` value as YAML (``1e-4``, ``true``, ``[1,2]``); text YAML cannot parse (``!x``,
    control characters, an open quote) stays the plain string, which validation then judges."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _describe(cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """Allowed field names at ``loc`` (for 'unknown field' errors)."""
    model: Any = cls
    for part in loc[:-1]:
        if isinstance(part, int):  # an index into a list of sections
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)
                      and issubclass(a, BaseModel)), ann)
    names = getattr(model, "model_fields", None)
    return ", ".join(names) if names else ""


def format_validation_error(err: ValidationError, cls: type[BaseModel], source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(x) for x in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _describe(cls, loc)
            lines.append(f"  field '{where}': unknown field; allowed fields: {allowed}")
        elif e["type"] == "literal_error":
            lines.append(f"  field '{where}': got {e.get('input')!r}; allowed values: "
                         f"{e.get('ctx', {}).get('expected', '')}")
        else:
            lines.append(f"  field '{where}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> C:
    """Read YAML (optional), apply overrides, validate into ``cls``."""
    data: dict[str, Any] = dict(base or {})
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data.update(loaded)
    if overrides:
        data = apply_overrides(data, list(overrides))
        source += " (with --set overrides)"
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls, source)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
