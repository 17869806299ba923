"""No-grad scoring of batches by a model: evaluation mode, micro-batched, results on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from alignlab.core.runtime import to_device
from alignlab.engine.learner import Units
from alignlab.models.logprobs import token_logprobs


@torch.no_grad()
def score_units(model: torch.nn.Module, units: Units,
                fn: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor], *,
                device: torch.device | str, micro_batch_size: int) -> torch.Tensor:
    """``fn(model, micro-batch)`` over ``units`` in order, ``micro_batch_size`` at a time, in
    eval mode without gradients; the results concatenated on the CPU along dim 0."""
    was_training = model.training
    model.eval()
    try:
        parts = []
        for start in range(0, units.n, micro_batch_size):
            idx = torch.arange(start, min(start + micro_batch_size, units.n))
            parts.append(fn(model, to_device(units.take(idx), device)).cpu())
        return torch.cat(parts)
    finally:
        model.train(was_training)


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], *, batch_size: int = 32, max_length: int = 256) -> float:
    """exp(mean NLL per token) of ``texts`` (each followed by eos), every token after the first."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length - 1]
                   + [tokenizer.eos_token_id] for t in texts[start:start + batch_size]]
            width = max(map(len, ids))
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
            attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            loss_mask = attn.clone()
            loss_mask[:, 0] = 0
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            batch = {"input_ids": input_ids, "attention_mask": attn, "position_ids": pos,
                     "loss_mask": loss_mask}
            total_nll -= token_logprobs(model, batch).sum().item()
            total_tokens += int(loss_mask.sum())
    finally:
        model.train(was_training)
    return float(torch.exp(torch.tensor(total_nll / max(total_tokens, 1))))
