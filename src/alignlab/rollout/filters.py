"""Logit processing for sampling, as pure functions on ``[B, V]`` float tensors.

Each truncation filter returns a copy of the logits with the dropped tokens set to ``-inf``;
the most likely token is always kept, so a row never becomes all ``-inf``. The order used by
``truncate`` is the one of Hugging Face ``generate`` (temperature, top-k, top-p, min-p), so the
same settings mean the same distribution in both.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from alignlab.core.errors import ConfigError


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """``z / T``: T < 1 sharpens the distribution, T > 1 flattens it (T must be > 0)."""
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0 to scale logits (0 means greedy), got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def _sorted_desc(values: Tensor) -> Tensor:
    """Each row sorted in descending order, values only. On CPU numpy's value sort is much faster
    than ``torch.sort``, which always builds indices (figures: ``benchmarks/README.md``)."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.ascontiguousarray(np.sort(values.numpy(), axis=-1)[..., ::-1]))
    return torch.sort(values, dim=-1, descending=True).values


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row (``k <= 0`` or ``k >= V`` keeps all).

    Ties at the k-th value are all kept, as in Hugging Face's ``TopKLogitsWarper``.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = _sorted_desc(logits.detach().float())[..., k - 1:k].to(logits.device)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability sums to at least ``p`` (``p >= 1`` keeps all; tokens tied with the least likely
    member of the set are kept too)."""
    if p >= 1.0:
        return logits
    if p <= 0:
        raise ConfigError(f"top_p must be in (0, 1], got {p}")
    probs = torch.softmax(logits.detach().float(), dim=-1)
    desc = _sorted_desc(probs).to(logits.device)
    # A token is in the nucleus if the mass strictly before it is still short of p.
    in_nucleus = (desc.cumsum(-1) - desc) < p
    size = in_nucleus.sum(-1, keepdim=True).clamp(min=1)
    threshold = desc.gather(-1, size - 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Min-p sampling (Nguyen et al. 2024): keep tokens with ``p(v) >= min_p * max_v p(v)``
    (``min_p <= 0`` keeps all)."""
    if min_p <= 0:
        return logits
    if min_p > 1:
        raise ConfigError(f"min_p must be in [0, 1], got {min_p}")
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def truncate(logits: Tensor, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Top-k, then top-p, then min-p on already temperature-scaled logits."""
    return min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)


__all__ = ["apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter", "truncate"]
