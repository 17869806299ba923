"""Seeding, device and precision choices shared by every trainer."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Literal

import numpy as np
import torch

Precision = Literal["auto", "fp32", "bf16"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmuls (AVX512-BF16 or AMX), so autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


AUTO_PRECISION_ENV = "ALIGNLAB_AUTO_PRECISION"


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """``precision`` itself, or for ``auto``: ``$ALIGNLAB_AUTO_PRECISION`` where set (``fp32`` or
    ``bf16``: the same numbers on every machine, e.g. the test suite's fp32), else bf16 where the
    device computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32."""
    if precision != "auto":
        return precision
    forced = os.environ.get(AUTO_PRECISION_ENV)
    if forced:
        if forced not in ("fp32", "bf16"):
            raise ValueError(f"{AUTO_PRECISION_ENV}: got {forced!r}; allowed values: fp32, bf16")
        return forced  # type: ignore[return-value]
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "fp32"


def autocast(device: torch.device, precision: Literal["fp32", "bf16"]):
    """bf16 autocast context (float32 master weights), or a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts matmul inputs to on ``device`` now, or None where it is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def default_cache_dir() -> str:
    return os.environ.get("ALIGNLAB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "alignlab"))


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
