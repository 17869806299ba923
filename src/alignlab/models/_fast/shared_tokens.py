"""Flat online-RL batches viewed as groups, so the one-pass prefix sharing can take them.

Online RL batches (``RolloutRole.to_batch``) hold each prompt once per sampled completion —
G times for GRPO's groups — each row right-padded to the longest. :func:`as_groups` views such a
batch as groups (every distinct prompt once, with the completions that follow it) for the
one-pass prefix sharing of :mod:`alignlab.models._fast.packed_groups`; the functions here bring
its results back to the flat ``[B, T]`` layout, equal to the plain path up to float rounding
(tested), so everything downstream (ratios, advantages, KL) is unchanged.

It applies when every row is right-padded with its ``loss_mask`` one block that ends at the
row's last real token after a non-empty prompt; :func:`alignlab.models.logprobs.fast_path`
decides whether the model takes the pass and whether it skips enough positions to pay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alignlab.models._fast.cpu_attention import cpu_attention
from alignlab.models._fast.packed_groups import (
    predictor_hidden,
    scored_logprobs,
    sequence_end_hidden,
)


def as_groups(batch: dict[str, Any]) -> dict[str, Tensor] | None:
    """The ``shared``-layout view (``prompt_ids``, ``prompt_lengths``, ``completion_ids``,
    ``completion_mask``, ``owner``, ``completion_lengths``) of a right-padded flat batch whose
    rows are prompt + completion, or None when the batch is not of that form."""
    input_ids, attn, loss_mask = batch["input_ids"], batch.get("attention_mask"), batch.get("loss_mask")
    if attn is None or loss_mask is None or input_ids.dim() != 2 or input_ids.shape[0] == 0:
        return None
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    lengths = attn.sum(1)
    starts = lengths - loss_mask.sum(1)
    if not (bool((attn.bool() == (pos < lengths[:, None])).all())
            and bool((loss_mask.bool() == ((pos >= starts[:, None]) & (pos < lengths[:, None]))).all())
            and int(starts.min()) >= 1):
        return None
    rows, starts_l = input_ids.tolist(), starts.tolist()
    index: dict[tuple[int, ...], int] = {}
    owner = [index.setdefault(tuple(r[:s]), len(index)) for r, s in zip(rows, starts_l)]
    prompts = list(index)
    width = max(map(len, prompts))
    prompt_ids = input_ids.new_zeros(len(prompts), width)
    for i, p in enumerate(prompts):
        prompt_ids[i, :len(p)] = torch.tensor(p, dtype=input_ids.dtype)
    comp_lengths = lengths - starts
    c = max(int(comp_lengths.max()), 1)
    take = (starts[:, None] + torch.arange(c, device=input_ids.device)[None]).clamp(max=input_ids.shape[1] - 1)
    completion_mask = torch.arange(c, device=input_ids.device)[None] < comp_lengths[:, None]
    return {"prompt_ids": prompt_ids.to(input_ids.device),
            "prompt_lengths": torch.tensor([len(p) for p in prompts], device=input_ids.device),
            "completion_ids": input_ids.gather(1, take) * completion_mask,
            "completion_mask": completion_mask.long(), "completion_lengths": comp_lengths,
            "owner": torch.tensor(owner, device=input_ids.device)}


def skipped_positions(batch: dict[str, Any], groups: dict[str, Tensor]) -> int:
    """Positions of the flat batch the shared pass does not compute (repeats and padding)."""
    packed = int(groups["prompt_lengths"].sum()) + int(groups["completion_lengths"].sum())
    return batch["input_ids"].numel() - packed


def _spread(values: Tensor, batch: dict[str, Any]) -> Tensor:
    """Row-major completion-token values back to the flat ``[B, T]`` layout, 0 elsewhere."""
    scored = batch["loss_mask"].bool()  # completion tokens, row-major: the order of ``values``
    return values.new_zeros(scored.shape).masked_scatter(scored, values)


def group_token_logprobs(decoder: nn.Module, head: nn.Module, batch: dict[str, Any],
                         groups: dict[str, Tensor], *, temperature: float = 1.0,
                         return_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``token_logprobs`` of the flat ``batch`` from one pass over its ``groups``."""
    with cpu_attention(batch["input_ids"].device):
        lp, ent, _ = scored_logprobs(decoder, head, groups, temperature=temperature,
                                     with_entropy=return_entropy)
    return (_spread(lp, batch), _spread(ent, batch)) if return_entropy else _spread(lp, batch)


def group_predictor_hidden(decoder: nn.Module, batch: dict[str, Any], groups: dict[str, Tensor]
                           ) -> tuple[Tensor, Tensor]:
    """``(hidden [n scored, H], targets [n scored])``: the hidden state that predicts each
    completion token of the flat ``batch`` (row-major), from one pass over its ``groups``."""
    with cpu_attention(batch["input_ids"].device):
        hidden, lay = predictor_hidden(decoder, groups)
    return hidden, lay.targets


def group_state_values(backbone: nn.Module, head: nn.Linear, batch: dict[str, Any],
                       groups: dict[str, Tensor]) -> Tensor:
    """A scalar head's ``V(s_t)`` at every completion token (``[B, T]``, 0 elsewhere), read from
    the hidden state that predicts the token."""
    hidden, _ = group_predictor_hidden(backbone, batch, groups)
    return _spread(head(hidden.float()).squeeze(-1), batch)


def group_sequence_values(backbone: nn.Module, head: nn.Linear, batch: dict[str, Any],
                          groups: dict[str, Tensor]) -> Tensor:
    """A scalar head's value at each row's last token (``[B]``, ``[B, K]`` with K heads)."""
    with cpu_attention(batch["input_ids"].device):
        hidden = sequence_end_hidden(backbone, groups)
    values = head(hidden.float())
    return values.squeeze(-1) if head.out_features == 1 else values


__all__ = ["as_groups", "group_predictor_hidden", "group_sequence_values", "group_state_values",
           "group_token_logprobs", "skipped_positions"]
