"""Per-token completion log-probs ``[N, C]`` of grouped batches, for token-level losses.

``lp[n, t] = log π(y_n,t | x_owner(n), y_n,<t)`` for ``t < |y_n|``, 0 beyond; the row sums equal
:func:`alignlab.models.prefix_sharing.completion_logprobs`. In the ``flat`` and ``packed``
layouts of :func:`alignlab.data.preference_batches.collate_groups` every completion token has
``loss_mask`` 1, so the scored tokens, in order, are the completions' tokens in order; a
``shared`` batch goes through the one-pass prefix sharing of
:mod:`alignlab.models.packed_groups` (SDPA decoders).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alignlab.models.cpu_attention import cpu_attention
from alignlab.models.logprobs import find_backbone_and_head, token_logprobs
from alignlab.models.packed_groups import group_pass_applies, group_pass_logprobs


def spread_tokens(values: Tensor, lengths: Tensor) -> Tensor:
    """The concatenated per-completion values ``[Σ lengths]`` as ``[N, max length]`` rows."""
    width = int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(width, device=lengths.device)[None] < lengths[:, None]
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def completion_token_logprobs(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Per-token log-probs ``[N, C]`` (float32) of a ``flat`` or ``packed`` batch."""
    if "prompt_ids" in batch:
        parts = find_backbone_and_head(model)
        if parts is None or not group_pass_applies(model):
            raise ValueError("completion_token_logprobs reads a prefix-sharing (shared) batch only "
                             "for decoders on SDPA attention; use the flat or packed layout")
        decoder, head = parts
        with cpu_attention(batch["prompt_ids"].device):
            return group_pass_logprobs(decoder, head, batch, per_token=True)
    view = {k: batch.get(k) for k in ("input_ids", "attention_mask", "position_ids", "loss_mask",
                                      "seq_lens")}
    lp = token_logprobs(model, view)
    scored = lp[view["loss_mask"].bool()]
    lengths = batch["completion_lengths"].to(lp.device)
    if scored.numel() != int(lengths.sum()):
        raise ValueError(f"{scored.numel()} scored tokens for completions of total length "
                         f"{int(lengths.sum())}; every completion needs a non-empty prompt")
    return spread_tokens(scored, lengths)


__all__ = ["completion_token_logprobs", "spread_tokens"]
