"""Completion log-probs of grouped batches, with the shared prompt computed once.

``log π(y_n | x_owner(n)) = Σ_t log p(y_n,t | x, y_n,<t)`` for every completion n of a batch
from :func:`alignlab.data.preference_batches.collate_groups`.

Prefix sharing (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix
Sharing"): the prompts run once with ``use_cache=True``; the KV cache is gathered to the
completions' rows (``Cache.batch_select_indices``, differentiable) and the completions run on
top with ``position_ids = prompt_length + t``. Gradients flow back through the cache into the
prompt's forward, so values and gradients equal the plain path (each completion joined to its
prompt) up to float rounding. Prompts are right-padded: a padded slot sits *between* prompt and
completion in the cache and is masked out by the 2D attention mask, while positions come from
``position_ids``, so no row attends to nothing (no NaN from fully-masked pad rows).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alignlab.models.logprobs import (chunked_logprobs, find_backbone_and_head, sequence_logprobs,
                                      token_logprobs)


def prefix_sharing_support(model: nn.Module) -> tuple[bool, str]:
    """``(True, "")`` when prefix sharing is exact for ``model``, else ``(False, why)``.

    Exact needs a decoder + plain output embedding (the chunked head), full causal attention
    (a sliding window or chunked attention would see the padded cache slots as distance), and a
    KV cache whose layers can be gathered along the batch."""
    if find_backbone_and_head(model) is None:
        return False, "its logits are post-processed or its output embedding is wrapped"
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    if getattr(cfg, "is_encoder_decoder", False):
        return False, "it is an encoder-decoder"
    for field in ("sliding_window", "attention_chunk_size"):
        if getattr(cfg, field, None) and getattr(cfg, "use_sliding_window", True):
            return False, f"it uses {field}={getattr(cfg, field)}"
    if getattr(model, "_is_stateful", False):
        return False, "it is a stateful (recurrent) model"
    return True, ""


def shared_prefix_logprobs(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Per-completion log-prob sums ``[N]`` (float32) from a ``shared`` layout batch."""
    decoder, head = find_backbone_and_head(model)
    prompt_ids, prompt_lengths = batch["prompt_ids"], batch["prompt_lengths"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    owner = batch["owner"]
    n_prompts, width = prompt_ids.shape
    positions = torch.arange(width, device=prompt_ids.device)
    prompt_mask = (positions[None] < prompt_lengths[:, None]).long()
    out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                  position_ids=positions.expand(n_prompts, width), use_cache=True)
    cache = out.cache  # transformers 5 renamed past_key_values to cache
    if not torch.equal(owner, torch.arange(n_prompts, device=owner.device)):
        cache.batch_select_indices(owner)
    lengths = prompt_lengths[owner]
    n, c = completion_ids.shape
    comp_pos = lengths[:, None] + torch.arange(c, device=owner.device)[None]
    hidden = decoder(input_ids=completion_ids,
                     attention_mask=torch.cat([prompt_mask[owner], completion_mask], 1),
                     position_ids=comp_pos, cache=cache, use_cache=True).last_hidden_state
    # The prompt's last real position predicts the first completion token.
    first = out.last_hidden_state[owner, lengths - 1]
    predictors = torch.cat([first[:, None], hidden[:, :-1]], 1)
    scored = completion_mask.bool()
    lp = chunked_logprobs(predictors[scored], head.weight, head.bias, completion_ids[scored])[0]
    rows = torch.arange(n, device=owner.device)[:, None].expand(n, c)[scored]
    return lp.new_zeros(n).index_add(0, rows, lp)


def flat_logprobs(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Per-completion log-prob sums ``[N]`` from a ``flat`` (padded) or ``packed`` batch."""
    view = {k: batch.get(k) for k in ("input_ids", "attention_mask", "position_ids", "loss_mask",
                                      "seq_lens")}
    return sequence_logprobs(token_logprobs(model, view), view)


def completion_logprobs(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Dispatch on the layout :func:`collate_groups` chose."""
    return shared_prefix_logprobs(model, batch) if "prompt_ids" in batch else flat_logprobs(model, batch)


__all__ = ["completion_logprobs", "flat_logprobs", "prefix_sharing_support",
           "shared_prefix_logprobs"]
