"""Loading policies, reference models and tokenizers (safetensors only, optional LoRA).

Everything goes through ``from_pretrained`` with ``use_safetensors=True`` so no pickle is ever
unpickled, and ``trust_remote_code`` stays False unless the caller asks for it. A path that does
not exist locally and cannot be fetched raises ``ConfigError`` naming it, not a hub traceback;
so does a local directory without config.json or tokenizer files, or with a truncated
safetensors file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignlab.core.config import LoraSettings
from alignlab.core.errors import ConfigError
from alignlab.models.adapters import apply_lora, quantization_kwargs, quiet_peft

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a config string to what ``from_pretrained(dtype=...)`` accepts."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _looks_like_local_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with a separator is meant as a path.
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or os.path.exists(name))


def _missing(name: str, cause: Exception | None = None) -> ConfigError:
    msg = (f"model path '{name}' is not a local directory and could not be fetched from the "
           "Hub; nothing is downloaded at run time here. Point it at a directory written by "
           "save_pretrained (config.json + *.safetensors).")
    if cause is not None:
        msg += f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})"
    return ConfigError(msg)


# Files a tokenizer can be built from (fast, BPE, WordPiece, SentencePiece, tiktoken).
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's adapter-only layout
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "tokenizer.model", "spiece.model", "tokenizer.tiktoken")


def check_safetensors_file(path: Path) -> None:
    """ConfigError unless ``path`` is a whole safetensors file: its header parses and the
    tensors it lists end exactly at the end of the file (reads the header only)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = f.read(n) if 0 <= n <= size - 8 else b""
    try:
        header = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: not a readable safetensors file ({size} bytes; its header is "
                          "cut off or corrupt). Copy or save the model again.")
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end != size:
        raise ConfigError(f"{path}: truncated or corrupt safetensors file: its header lists "
                          f"{8 + n + end} bytes but the file has {size} (an interrupted copy or "
                          "download?). Copy or save the model again.")


def check_model_dir(root: Path, what: str) -> None:
    """Problems ``from_pretrained`` would report as a traceback, as one ConfigError naming the
    directory: no config.json, no tokenizer files, a truncated safetensors file."""
    if what == "tokenizer":
        if not any((root / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(f"'{root}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                              "save the tokenizer next to the model (tokenizer.save_pretrained)")
        return
    if not (root / "config.json").is_file():
        raise ConfigError(f"model directory '{root}' has no config.json. Point it at a "
                          "directory written by save_pretrained.")
    if what == "model":
        for file in sorted(root.glob("*.safetensors")):
            check_safetensors_file(file)


def from_pretrained_checked(auto_cls: Any, name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained(name_or_path, **kwargs)`` with user-facing errors."""
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        name = str(local)
        kind = getattr(auto_cls, "__name__", "")
        check_model_dir(local, "tokenizer" if "Tokenizer" in kind else
                        "config" if kind.endswith("Config") else "model")
    elif _looks_like_local_path(name):
        raise _missing(name)
    try:
        return auto_cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        if local.is_dir():
            raise ConfigError(f"could not load '{name}': {str(err).splitlines()[0][:300]} "
                              "(only safetensors checkpoints are loaded)") from err
        if isinstance(err, ValueError):
            raise
        raise _missing(name, err) from err


def model_load_kwargs(dtype: str | torch.dtype, trust_remote_code: bool,
                  attn_implementation: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "use_safetensors": True,
                              "trust_remote_code": bool(trust_remote_code)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def load_model(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
               trust_remote_code: bool = False, device: str | torch.device = "cpu",
               lora: LoraSettings | None = None,
               attn_implementation: str | None = None) -> nn.Module:
    """A causal LM from a local ``save_pretrained`` directory (or a cached hub id), on ``device``,
    optionally wrapped with LoRA (``lora.quantize``: its frozen weights loaded by bitsandbytes
    onto the GPU, QLoRA). Left in train mode: the trainer decides eval/train.
    """
    from transformers import AutoModelForCausalLM

    kwargs = model_load_kwargs(dtype, trust_remote_code, attn_implementation)
    quantized = quantization_kwargs(lora, kwargs["dtype"])
    kwargs.update(quantized)
    adapter = Path(name_or_path).expanduser()
    if (adapter / ADAPTER_CONFIG).is_file() and not (adapter / "config.json").is_file():
        if quantized:
            raise ConfigError(f"field 'model.lora.quantize': '{adapter}' holds adapters to merge "
                              "into full-precision weights; point model.name_or_path at the "
                              "run's merged final/ to quantize it")
        model = load_adapter(adapter, kwargs)
    else:
        model = from_pretrained_checked(AutoModelForCausalLM, name_or_path, **kwargs)
    if not quantized:  # a quantized model is placed on its GPU while it loads
        model.to(device)
    model.train()
    if lora is not None:
        model = apply_lora(model, lora)
    return model


def load_adapter(adapter_dir: Path, kwargs: dict[str, Any]) -> nn.Module:
    """A LoRA adapter directory (``final/adapter``, PEFT's layout) merged into the base model
    its ``adapter_config.json`` names: a plain causal LM, as ``final/`` holds (a QLoRA run's
    merged model too: its base is loaded unquantized here)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base_path = base["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{adapter_dir / ADAPTER_CONFIG}: not a PEFT adapter config with a "
                          "'base_model_name_or_path'") from None
    for file in sorted(adapter_dir.glob("*.safetensors")):
        check_safetensors_file(file)
    model = from_pretrained_checked(AutoModelForCausalLM, base_path, **kwargs)
    with quiet_peft():
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode (dropout off): for reference and reward models."""
    model.requires_grad_(False)
    model.eval()
    return model


def load_reference_model(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                         trust_remote_code: bool = False, device: str | torch.device = "cpu",
                         attn_implementation: str | None = None) -> nn.Module:
    """The frozen reference policy pi_ref of KL-regularised objectives (no LoRA, eval mode)."""
    return freeze(load_model(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                             device=device, attn_implementation=attn_implementation))


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved next to a model; a missing pad token falls back to the eos token."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained_checked(AutoTokenizer, name_or_path,
                                        trust_remote_code=bool(trust_remote_code))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer '{name_or_path}' has neither a pad nor an eos token; "
                              "add a pad token to it before training")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


__all__ = ["load_adapter", "load_model", "load_reference_model", "load_tokenizer", "freeze",
           "apply_lora", "resolve_dtype", "from_pretrained_checked", "model_load_kwargs"]
