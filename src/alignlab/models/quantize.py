"""A frozen model's decoder matmuls in int8, for a cheaper reference pass on CPU.

The DPO family's reference only runs forward, once per example, and its log-probs enter the loss
only through ``β·(log π − log π_ref)``; int8 weights and activations (dynamic quantisation:
weights per output channel, each activation tensor scaled on the fly) make its linear layers run
on CPU's integer dot-product kernels, about twice as fast as float32 matmuls on AVX2 (measured in
``benchmarks/README.md``). The output head stays in float32 (the log-probs are read through its
weight, and it is where rounding would show most), and so do norms, attention and embeddings.

torch's dynamic quantisation (``torch.ao.quantization.quantize_dynamic``) is the kernel that runs
on CPU here; torch marks it deprecated in favour of torchao, whose int8 dynamic path targets GPUs
and ``torch.compile``. Its CPU kernels (fbgemm/oneDNN) exist only on CPU, so int8 is refused
on other devices.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

from alignlab.core.errors import ConfigError
from alignlab.models.backbone import find_decoder

Quantization = Literal["none", "int8"]


def check_quantization(mode: str, *, device: torch.device, precision: str, field: str) -> None:
    """Refuse ``mode`` where it cannot run: not one of none/int8, int8 off CPU or off fp32
    (``field`` names the config field in the message)."""
    if mode == "none":
        return
    if mode != "int8":
        raise ConfigError(f"field '{field}': {mode!r} is not one of none, int8")
    if device.type != "cpu":
        raise ConfigError(f"field '{field}': int8 runs on CPU only (torch's dynamic int8 kernels); "
                          f"the device is {device.type}; set it to none")
    if precision != "fp32":
        raise ConfigError(f"field '{field}': int8 takes float32 activations; train.precision "
                          f"resolved to {precision}; set train.precision to fp32 or {field} to none")


def quantize_frozen(model: nn.Module, mode: Quantization, *, device: torch.device,
                    precision: str, field: str) -> nn.Module:
    """``model`` with its decoder's ``nn.Linear`` layers as dynamic int8 ones (``mode`` int8;
    in place, so the model must be a frozen one of its own, never a trainable policy's), or
    unchanged (``none``). ``field`` names the config field in errors."""
    check_quantization(mode, device=device, precision=precision, field=field)
    if mode == "none":
        return model
    if any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"field '{field}': int8 is for a frozen reference, and this model trains")
    decoder = find_decoder(model)
    if decoder is None:
        raise ConfigError(f"field '{field}': {type(model).__name__} has no decoder to quantise; "
                          "set it to none")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # the deprecation notices of torch.ao (module docstring)
        warnings.simplefilter("ignore")
        quantize_dynamic(decoder, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                         inplace=True)
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a dynamic int8 linear layer."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(isinstance(m, DynamicLinear) for m in model.modules())


__all__ = ["Quantization", "check_quantization", "is_quantized", "quantize_frozen"]
