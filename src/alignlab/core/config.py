"""Typed configs: YAML files plus ``--set a.b=c`` overrides, validated by pydantic.

Every section forbids unknown keys, and every validation problem is reported as
``<file>: field 'a.b': <problem>`` with the allowed values or fields, never as a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from alignlab.core.errors import ConfigError


class Section(BaseModel):
    """A config section. The docstring under a field is its description (shown by
    ``alignlab train NAME --help``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              use_attribute_docstrings=True)


class LoraSettings(Section):
    """LoRA adapter (Hu et al. 2021, "LoRA"): ``W + (alpha / r) B A`` on ``target_modules``.

    ``target_modules="all-linear"`` is PEFT's shorthand for every linear layer except the output
    embedding (which keeps ``token_logprobs`` on its chunked path)."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    quantize: Literal["4bit", "8bit"] | None = None
    """QLoRA (Dettmers et al. 2023): the frozen weights stored in 4-bit NF4 (double-quantized)
    or 8-bit by bitsandbytes; needs bitsandbytes and a CUDA GPU (``train.device`` auto/cuda)."""


class ModelSection(Section):
    name_or_path: str = "world:base"
    """A Hub name, a local directory, or ``world:base`` for the built-in world's base model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """The weights' storage dtype; compute precision is ``train.precision``."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (off: only transformers' built-in classes)."""
    attn_implementation: str | None = None
    """transformers' ``attn_implementation`` (``sdpa``, ``eager``, ...); None keeps its default."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of every weight; ``final/`` holds the merged model and
    ``final/adapter/`` the adapters alone."""


class DataSection(Section):
    source: str = "world:positive"
    """A JSONL/Parquet file, a ``datasets`` folder, a Hub dataset name, or ``world:<task>``
    (the task's demonstrations)."""
    format: str | None = None
    """The row format (``alignlab list formats``); None detects it from the columns."""
    split: str = "train"
    """The split of a ``datasets`` folder or Hub dataset."""
    limit: int | None = Field(None, gt=0)
    """Use only the first ``limit`` rows."""
    max_length: int = Field(256, gt=1)
    """Tokens per example (prompt + completion); longer rows follow ``truncation``."""
    truncation: Literal["keep_end_of_prompt", "truncate_completion", "drop"] = "keep_end_of_prompt"
    """How over-long rows are cut; rows left without a trainable token are dropped and counted."""
    packing: bool = False
    """Pack several examples into one row (no padding; attention kept within each example)."""
    completion_only_loss: bool = True
    """Train only on completion (assistant) tokens, not on the prompt."""


class WorldSection(Section):
    preset: Literal["full", "tiny"] = "full"
    """The built-in world's size: ``full`` (the demo) or ``tiny`` (tests)."""
    seed: int = 0
    """The world's seed (corpus, tokenizer, base model)."""
    cache_dir: str | None = None
    """Defaults to ``$ALIGNLAB_CACHE`` or ``~/.cache/alignlab``."""


class RaySection(Section):
    """Where the roles of online training run under ``train.placement: ray``
    (``engine/ray_placement.py``): rollout workers, each holding a copy of the policy, and one
    reward worker (rewards, judges); the trainer updates in this process and sends the weights
    to the rollout workers after every update. Needs ``pip install 'alignlab[ray]'``."""

    address: str | None = None
    """None: start a Ray instance on this machine for the run (stopped at its end); ``auto``:
    join the cluster ``ray start --head`` started; ``ray://host:10001``: a remote cluster
    through Ray Client. A Ray already initialised in this process is used as it is."""
    num_rollout_workers: int = Field(2, gt=0)
    """Actors sampling the rollouts; each takes a contiguous share of an iteration's prompts in
    whole decode chunks (``rollout.batch_size // rollout.n`` prompts), so the samples are those
    of one process with the same seed."""
    num_cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each rollout worker; it decodes with that many torch threads (at
    least 1)."""
    num_gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each rollout worker (a fraction shares one GPU)."""
    reward_worker: bool = True
    """Score rewards and judge pairs on an actor of their own; false: in the trainer's process."""
    reward_num_cpus: float = Field(1.0, gt=0)
    """CPUs Ray reserves for the reward worker."""
    reward_num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for the reward worker (a reward model or an LLM judge)."""
    num_cpus: int | None = Field(None, gt=0)
    """CPUs of a Ray instance started for the run (None: Ray counts them; unused when joining a
    cluster)."""
    object_store_memory_mb: int | None = Field(None, gt=0)
    """Object store of a Ray instance started for the run (None: Ray's default, 30% of memory)."""
    runtime_env: dict[str, Any] = {}
    """Ray's ``runtime_env`` of the job (``env_vars``, ``working_dir``, ``pip``, ...)."""


def _checkpointing(value: Any) -> Any:
    """``train.gradient_checkpointing`` from YAML or a ``--set`` string: true, false or
    ``selective``; anything else is named with the allowed values (one message, not one per
    member of the union)."""
    if isinstance(value, bool) or value == "selective":
        return value
    text = str(value).strip().lower()
    if text in ("true", "false", "selective"):
        return {"true": True, "false": False}.get(text, text)
    raise ValueError("allowed values: true, false, 'selective'")


Checkpointing = Annotated[bool | Literal["selective"], BeforeValidator(_checkpointing)]


class TrainSection(Section):
    output_dir: str = "runs/sft"
    """The run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, final/, DONE."""
    seed: int = 0
    """Seeds every RNG before any model is built (same seed, same run)."""
    max_steps: int = Field(100, gt=0)
    """Optimizer steps (online trainers: iterations)."""
    batch_size: int = Field(16, gt=0)
    """Micro-batch size (examples per forward pass). With N processes an offline trainer's
    micro-batch is global, each process taking ``batch_size / N`` of it; an online learner's
    stays the rows of one forward on each process (``docs/scaling.md``)."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step (the loss is normalised over all of them)."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's decoupled weight decay (not applied to biases and norms)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """The schedule after warmup, per optimizer step."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from 0 to ``lr``."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient's global norm to this (None: no clipping)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: ``auto`` is bf16 where the device runs it natively, else fp32
    (``$ALIGNLAB_AUTO_PRECISION`` = fp32 or bf16 decides it instead where set)."""
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ..."""
    log_every: int = Field(10, gt=0)
    """Write metrics (JSONL, TensorBoard) every this many steps, and at the last step."""
    save_every: int | None = Field(200, gt=0)
    """Write a checkpoint every this many steps and at the last step (None: never; then a
    stopped run cannot resume)."""
    save_total_limit: int = Field(2, gt=0)
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: bool = False
    """Resume from the newest checkpoint in ``output_dir`` when one exists."""
    overwrite: bool = False
    """Replace an earlier run in ``output_dir`` (its checkpoints, metrics, final model, DONE);
    without it (or ``resume``) a non-empty run directory is refused."""
    tensorboard: bool = True
    """Write TensorBoard scalars to ``output_dir/tensorboard`` (beside ``metrics.jsonl``)."""
    report_to: list[Literal["wandb"]] = []
    """More metric sinks beside ``metrics.jsonl`` and TensorBoard: ``wandb`` (Weights & Biases;
    needs ``pip install wandb``; project and mode from ``WANDB_PROJECT``/``WANDB_MODE``)."""
    progress: bool = True
    """Show a progress bar."""
    gradient_checkpointing: Checkpointing = False
    """Recompute each decoder layer in backward: less activation memory for about a third more
    compute; turn it on only when memory needs it. ``selective`` keeps the matmuls' outputs and
    recomputes only the element-wise ops between them: part of the saving for a few percent
    more compute (``models/checkpointing.py``)."""
    sharding: Literal["none", "fsdp", "zero1", "zero2", "zero3"] = "none"
    """With N processes: ``none`` (data parallel: every process holds the whole model and its
    optimizer state), ``fsdp`` (FSDP2: each decoder layer's weights, gradients and AdamW
    state sharded over the processes), ``zero1`` / ``zero2`` / ``zero3`` (DeepSpeed ZeRO stage
    1: the AdamW state partitioned; stage 2: the gradients too; stage 3: the weights too; needs
    ``pip install deepspeed``); ``docs/scaling.md``. ``accelerate launch`` with
    ``configs/accelerate/fsdp2.yaml``, ``zero2.yaml`` or ``zero3.yaml`` sets it too. One process
    ignores it."""


class VLLMSection(Section):
    """The vLLM rollout backend (``rollout.backend: vllm``; ``rollout/vllm_backend.py``): a
    ``vllm.LLM`` in the trainer's process, colocated on its GPU, its weights overwritten from the
    policy before each rollout. Needs ``pip install 'alignlab[vllm]'`` and a CUDA GPU."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Fraction of the GPU vLLM takes for its weights and KV cache; the trainer shares the rest
    (TRL's colocate default is 0.3 too)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs the rollout model is split over (vLLM's own worker processes)."""
    dtype: Literal["train", "bfloat16", "float16", "float32"] = "train"
    """vLLM's weight and compute dtype; ``train`` follows ``train.precision`` (fp32 or bf16), so
    the sampler's log-probs differ from the trainer's by kernels only, not by precision."""
    enforce_eager: bool = False
    """No CUDA graphs (slower decoding, faster start, less memory)."""
    max_model_len: int | None = Field(None, gt=0)
    """Longest prompt + completion; None: the model config's maximum."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of a repeated prompt prefix (the n samples of a prompt); the cache is
    reset after every weight sync."""
    lora_sync: Literal["merged", "adapter"] = "merged"
    """With ``model.lora``: ``merged`` loads W + (alpha/r)·B·A into vLLM's plain weights each
    sync (TRL's colocate mode; full-speed decoding); ``adapter`` writes the adapters alone and
    samples through vLLM's LoRA kernels with a new ``LoRARequest`` per sync (verl's choice)."""
    enable_sleep_mode: bool = False
    """Free vLLM's weights and KV cache while the trainer updates (``LLM.sleep(level=2)``) and
    reload them at the next sync; not with ``rl.max_staleness`` > 0, where both run at once."""
    engine_kwargs: dict[str, Any] = {}
    """Further keywords for ``vllm.LLM`` (e.g. ``max_num_seqs``, ``quantization``)."""


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
    """Sampling temperature of the rollouts."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    batch_size: int = Field(64, gt=0)
    """Sequences decoded together (prompts x n)."""
    backend: Literal["builtin", "vllm"] = "builtin"
    """The sampler: alignlab's built-in engine on the policy module, or vLLM (a GPU and the
    ``vllm`` extra; the policy-gradient trainers; settings in ``rollout.vllm``)."""
    vllm: VLLMSection = VLLMSection()
    """Settings of the vLLM backend (used only with ``backend: vllm``)."""


class OnlineTrainSection(TrainSection):
    """``TrainSection`` with online-training defaults; ``max_steps`` counts iterations (one
    rollout batch each), and the LR schedule advances once per iteration."""

    output_dir: str = "runs/online"
    max_steps: int = Field(100, gt=0)
    lr: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    log_every: int = Field(1, gt=0)
    save_every: int | None = Field(25, gt=0)
    """Write a checkpoint every this many iterations and at the last (None: never)."""
    placement: Literal["local", "ray"] = "local"
    """Where the roles run: ``local``, all in this process; ``ray``, rollout and reward workers
    as Ray actors (``train.ray``), the update here. Same seed, same samples and updates."""
    ray: RaySection = RaySection()
    """Ray settings (used only with ``placement: ray``)."""


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


def set_dotted(data: dict[str, Any], key: str, value: Any, *, merge: bool = False,
               where: str = "") -> None:
    """``data[a][b] = value`` for ``key = "a.b"``, creating missing sections. ``merge``: a
    mapping value is merged key by key into a mapping already there (so ``{train: {lr: 1e-4}}``
    keeps the other ``train`` keys) and replaces anything else. Errors start with ``where``."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"{where}empty key {key!r}")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}{key}: '{p}' is a value, not a section")
        node = child
    last = parts[-1]
    if merge and isinstance(value, dict) and isinstance(node.get(last), dict):
        for k, v in value.items():
            set_dotted(node[last], k, v, merge=True, where=where)
    else:
        node[last] = value


def with_section_defaults(cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with, under each section the user gave, the values a config class's own default
    section sets (``alignlab train ipo``'s ``PreferenceSection(loss="ipo")``, its
    ``TrainSection(lr=1e-5, ...)``), the user's keys winning. Pydantic builds a section the
    user names afresh from the user's mapping alone, so without this ``--set preference.beta=0.3``
    on ``ipo`` trained DPO (the section's class default loss), silently."""
    out = dict(data)
    for name, info in cls.model_fields.items():
        key = info.alias or name
        default = info.default
        if isinstance(default, BaseModel) and isinstance(out.get(key), dict):
            kept = default.model_dump(exclude_unset=True, by_alias=True)
            if kept:
                merged: dict[str, Any] = {}
                set_dotted(merged, key, kept)
                set_dotted(merged, key, out[key], merge=True)
                out[key] = merged[key]
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides; values are parsed as YAML (``1e-4``, ``true``, ``[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        set_dotted(data, key, _parse_override(raw), where="--set ")
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
    data = with_section_defaults(cls, data)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls, source)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
