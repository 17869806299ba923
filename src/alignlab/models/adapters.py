"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through
peft, and the models a trainer derives from an adapted policy without copying its weights.

``W' = W + (alpha / r) B A`` on the ``target_modules``; ``W`` stays frozen, only ``A`` and ``B``
(and the ``modules_to_save``) train. QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning
of Quantized LLMs") stores ``W`` in 4-bit NF4 (or 8-bit) through bitsandbytes on a CUDA GPU.

What a trainer derives from an adapted model, none of it a second copy of the frozen weights:

- :func:`adapters_disabled` — π_ref, the base model under the adapters: what peft's
  ``disable_adapter()`` context computes (a disabled LoRA layer returns ``base_layer(x)``), as a
  plain module of its own whose layers *are* the policy's base layers. Being a module of its
  own, it takes every log-prob fast path, samples with the rollout engine and stays in eval mode
  while the policy trains, with no context to enter and leave around each use;
- :func:`copy_sharing_frozen` — a copy that shares every frozen tensor and copies the trained
  ones (PPO's critic, NLPO's masking policy, TR-DPO's refreshed reference): under LoRA only the
  adapters are copied;
- :func:`merged` — the model with the adapters merged into fresh tensors (what ``final/``
  holds), the policy left as it is.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from alignlab.core.config import LoraSettings
from alignlab.core.errors import ConfigError

QUANTIZE_FIELD = "model.lora.quantize"
ADAPTER_DIR = "adapter"
"""Where a LoRA run saves its adapters alone, inside ``final/`` (peft's layout)."""


def lora_config(lora: LoraSettings, task_type: str | None = "CAUSAL_LM") -> Any:
    """peft's ``LoraConfig`` for ``lora``; ``task_type`` None for a bare decoder body."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, modules_to_save=lora.modules_to_save,
                      task_type=task_type)


def apply_lora(model: nn.Module, lora: LoraSettings,
               task_type: str | None = "CAUSAL_LM") -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA model; only the adapter parameters (and
    ``modules_to_save``) stay trainable. A quantized model is first prepared for k-bit training
    (peft's ``prepare_model_for_kbit_training``: norms in float32, no checkpointing forced)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with quiet_peft():
        return get_peft_model(model, lora_config(lora, task_type))


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Building a ``PeftModel`` reads ``is_gradient_checkpointing``, which transformers 5
    deprecated: a warning the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        yield


def quantization_kwargs(lora: LoraSettings | None, dtype: torch.dtype | str) -> dict[str, Any]:
    """``from_pretrained`` keywords that load the frozen weights quantized (QLoRA), or {} when
    ``lora.quantize`` is unset. ConfigError naming the field without bitsandbytes or a GPU."""
    if lora is None or lora.quantize is None:
        return {}
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if missing:
        raise ConfigError(f"field '{QUANTIZE_FIELD}': {lora.quantize!r} (QLoRA) stores the frozen "
                          f"weights with bitsandbytes on a CUDA GPU, but {' and '.join(missing)}; "
                          "remove the field to train LoRA on unquantized weights")
    from transformers import BitsAndBytesConfig

    compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    if lora.quantize == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # bitsandbytes quantizes while loading onto the GPU; the model never exists unquantized.
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model``'s frozen weights are stored by bitsandbytes (QLoRA)."""
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def _tuner_classes() -> tuple[type, type]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return BaseTunerLayer, AuxiliaryTrainingWrapper


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds peft adapter layers (LoRA), wrapped in a ``PeftModel`` or not."""
    tuner, _ = _tuner_classes()
    return any(isinstance(m, tuner) for m in model.modules())


def _unwrapped(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _without_tuners(model: nn.Module, merge: bool, device: str | None = None) -> nn.Module:
    """A plain module with ``model``'s structure, every tensor shared, each adapter layer
    replaced by its base layer (``merge``: by a merged copy of it, the only new tensors, moved
    to ``device`` one layer at a time)."""
    tuner, wrapper = _tuner_classes()
    body = _unwrapped(model)
    shared = {id(t): t for t in [*body.parameters(), *body.buffers()]}
    view = copy.deepcopy(body, memo=shared)
    replaced: list[str] = []
    for name, module in list(view.named_modules()):
        if any(name.startswith(done + ".") for done in replaced):
            continue
        if isinstance(module, tuner):
            if merge:
                module = copy.deepcopy(module)  # its own tensors: merging leaves the policy as is
                module.merge()
            base = module.get_base_layer()
            _replace(view, name, base.to(device) if merge and device is not None else base)
        elif isinstance(module, wrapper):
            _replace(view, name, module.unload_and_optionally_merge_module(True, False, None)
                     if merge else module.original_module)
        else:
            continue
        replaced.append(name)
    if "peft_config" in view.__dict__:
        del view.peft_config
    return view


def adapters_disabled(model: nn.Module) -> nn.Module:
    """π_ref of an adapted policy: its base model with the adapters disabled, frozen and in eval
    mode, sharing every weight with ``model`` (no second copy). Its outputs are exactly those of
    ``model`` inside peft's ``disable_adapter()`` (tested)."""
    if not has_adapters(model):
        raise ConfigError("adapters_disabled: the model has no adapters to disable")
    view = _without_tuners(model, merge=False)
    for p in view.parameters():  # the shared base weights: frozen under LoRA already
        if p.requires_grad:
            raise ConfigError("adapters_disabled: a base weight of the adapted model is trainable "
                              "(is it in model.lora.modules_to_save?); π_ref would move with it")
    return view.eval()


def merged(model: nn.Module, device: str | None = None) -> nn.Module:
    """``model`` with its adapters merged (``W + (alpha/r) B A``, ``modules_to_save`` taken as
    trained) as a plain module: new tensors for the merged layers only (on ``device``, e.g. the
    CPU for saving, so a GPU holds one merged layer at a time), ``model`` unchanged."""
    return _without_tuners(model, merge=True, device=device)


def copy_sharing_frozen(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares its frozen parameters (``requires_grad`` False) and
    copies the rest: under LoRA the base weights stay one copy and only the adapters are new;
    without adapters it is an ordinary deep copy."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters() if not p.requires_grad})


def reference_model(policy: nn.Module) -> nn.Module:
    """The frozen reference π_ref = the policy as training starts: with adapters the base model
    with them disabled (:func:`adapters_disabled`, shared weights), else a frozen deep copy."""
    if has_adapters(policy):
        return adapters_disabled(policy)
    return copy.deepcopy(policy).requires_grad_(False).eval()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``model`` as it is now that moves only when loaded into (NLPO's
    masking policy, TR-DPO's refreshed reference): under LoRA the adapters are copied and the
    base weights shared."""
    copied = copy_sharing_frozen(model)
    for p in copied.parameters():
        p.requires_grad_(False)  # the shared frozen ones are False already
    return copied.eval()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must keep of ``model``: without adapters its whole state; with them the
    adapters, the ``modules_to_save`` and anything else that trains (a critic's head), not the
    frozen base weights, which the model is rebuilt with on resume."""
    if not has_adapters(model):
        return model.state_dict()
    tuner, wrapper = _tuner_classes()
    names = {n for m in model.modules() if isinstance(m, (tuner, wrapper))
             for n in m.adapter_layer_names}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items()
            if k in trained or names.intersection(k.split("."))}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`adapter_state_dict` kept; every key it would keep must be there."""
    if not has_adapters(model):
        model.load_state_dict(state)
        return
    lost = sorted(set(adapter_state_dict(model)) - set(state))
    _, unexpected = model.load_state_dict(state, strict=False)
    if lost or unexpected:
        raise ConfigError(f"the saved adapter state does not fit the model: missing {lost[:3]}, "
                          f"unexpected {list(unexpected)[:3]}")


def save_adapters(model: nn.Module, directory: Any) -> None:
    """The adapters alone in peft's layout (``adapter_config.json``,
    ``adapter_model.safetensors``): a ``PeftModel`` saves itself; a module with adapters
    injected (a reward model's body) is saved as a ``PeftModel`` of its base model would be."""
    from pathlib import Path

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if isinstance(model, PeftModel):
        model.save_pretrained(directory)
        return
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.copy(model.peft_config["default"])
    config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    config.save_pretrained(str(out))
    state = get_peft_model_state_dict(model)
    save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def trained_bytes(*models: nn.Module) -> dict[str, int]:
    """What a run holds in memory for ``models`` (a policy, its reference, a critic), each
    storage counted once however many modules share it: ``weights`` (every parameter and
    buffer), ``gradients`` (one per trainable element) and ``optimizer`` (Adam's two moments per
    trainable element), in bytes, and their ``total``."""
    storages: dict[int, tuple[int, bool]] = {}
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            key = t.untyped_storage().data_ptr()
            size, trained = storages.get(key, (0, False))
            storages[key] = (max(size, t.untyped_storage().nbytes()),
                             trained or bool(t.requires_grad))
    weights = sum(size for size, _ in storages.values())
    trainable = sum(size for size, trained in storages.values() if trained)
    return {"weights": weights, "gradients": trainable, "optimizer": 2 * trainable,
            "total": weights + 3 * trainable}


__all__ = ["ADAPTER_DIR", "QUANTIZE_FIELD", "adapter_state_dict", "adapters_disabled",
           "apply_lora", "copy_sharing_frozen", "frozen_copy", "has_adapters", "is_quantized",
           "load_adapter_state_dict", "lora_config", "merged", "quantization_kwargs", "quiet_peft",
           "reference_model", "save_adapters", "trained_bytes"]
