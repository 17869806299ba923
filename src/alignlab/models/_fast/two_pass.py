"""Prefix sharing in two passes, for decoders the one-pass group layout cannot take.

``log π(y_n | x_owner(n)) = Σ_t log p(y_n,t | x, y_n,<t)`` for every completion n of a
``shared`` batch from :func:`alignlab.data.preference_batches.collate_groups`, the shared prompt
computed once (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix
Sharing"). SDPA decoders take the one-pass form (:mod:`alignlab.models._fast.packed_groups`);
:func:`alignlab.models.logprobs.fast_path` decides. Here the prompts run once with
``use_cache=True``; the KV cache is gathered to the completions' rows
(``Cache.batch_select_indices``, differentiable) and the completions run on top with
``position_ids = prompt_length + t``. Gradients flow back through the cache into the
prompt's forward, so values and gradients equal the plain path (each completion joined to its
prompt) up to float rounding. Prompts are right-padded: a padded slot sits *between* prompt and
completion in the cache and is masked out by the 2D attention mask, while positions come from
``position_ids``, so no row attends to nothing (no NaN from fully-masked pad rows).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from alignlab.models._fast.last_layer import last_layer_only_at
from alignlab.models.backbone import chunked_logprobs
from alignlab.models.checkpointing import checkpointing_enabled


def _select_batch(cache: Any, index: Tensor) -> None:
    """Gather every cache layer's rows to ``index``.

    When every group has the same number of completions (pairs), slot-major order makes
    ``index`` the prompts repeated, so ``repeat`` (backward: a sum) replaces the gather, whose
    backward is a scatter-add, slow on CPU (benchmarks/README.md)."""
    n_prompts = int(index.max()) + 1
    repeats = index.numel() // n_prompts
    tiled = (repeats * n_prompts == index.numel()
             and torch.equal(index, torch.arange(n_prompts, device=index.device).repeat(repeats)))
    for layer in cache.layers:
        if type(layer) is DynamicLayer and layer.is_initialized:
            if tiled:
                layer.keys = layer.keys.repeat(repeats, 1, 1, 1)
                layer.values = layer.values.repeat(repeats, 1, 1, 1)
            else:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        else:
            layer.batch_select_indices(index)


def two_pass_logprobs(model: nn.Module, decoder: nn.Module, head: nn.Module,
                      batch: dict[str, Any]) -> Tensor:
    """Per-completion log-prob sums ``[N]`` (float32) of a ``shared`` batch: the prompts with a
    KV cache, then the completions on it (``decoder``, ``head``: ``model``'s body and output
    embedding)."""
    if checkpointing_enabled(model) and model.training and torch.is_grad_enabled():
        raise ValueError("prefix sharing on a non-SDPA decoder needs the KV cache, which "
                         "activation checkpointing turns off: use the flat or packed layout")
    prompt_ids, prompt_lengths = batch["prompt_ids"], batch["prompt_lengths"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    owner = batch["owner"]
    n_prompts, width = prompt_ids.shape
    positions = torch.arange(width, device=prompt_ids.device)
    prompt_mask = (positions[None] < prompt_lengths[:, None]).long()
    # No mask on the prompt pass: prompts are right-padded, so under the causal mask a real token
    # never sees a pad, and SDPA takes its is_causal kernel (no dense mask, upper blocks skipped).
    # The pads' keys/values land in the cache and are masked out in the completion pass.
    last_real = torch.arange(n_prompts, device=prompt_ids.device) * width + prompt_lengths - 1
    with last_layer_only_at(decoder, last_real):
        out = decoder(input_ids=prompt_ids, use_cache=True)
    cache = out.cache  # transformers 5 renamed past_key_values to cache
    if not torch.equal(owner, torch.arange(n_prompts, device=owner.device)):
        _select_batch(cache, owner)
    lengths = prompt_lengths[owner]
    n, c = completion_ids.shape
    comp_pos = lengths[:, None] + torch.arange(c, device=owner.device)[None]
    hidden = decoder(input_ids=completion_ids,
                     attention_mask=torch.cat([prompt_mask[owner], completion_mask], 1),
                     position_ids=comp_pos, cache=cache, use_cache=True).last_hidden_state
    # Token t of completion n is predicted by its hidden row t-1, the first token by the prompt's
    # last real position. Integer gathers (index_select) rather than boolean masks: no [N, C, H]
    # concatenation, and an index_add backward.
    with torch.no_grad():
        nonempty = torch.nonzero(completion_mask[:, 0]).squeeze(1)
        later = torch.nonzero(completion_mask[:, 1:].reshape(-1)).squeeze(1)  # n * (c-1) + t-1
        later_rows = later // (c - 1) if c > 1 else later
        later_hidden = later_rows * c + later % max(c - 1, 1)
        rows = torch.cat([nonempty, later_rows])
        targets = torch.cat([completion_ids[nonempty, 0],
                             completion_ids[:, 1:].reshape(-1).index_select(0, later)])
        first = owner[nonempty] * width + lengths[nonempty] - 1
    h = hidden.shape[-1]
    predictors = torch.cat([out.last_hidden_state.reshape(-1, h).index_select(0, first),
                            hidden.reshape(-1, h).index_select(0, later_hidden)])
    lp = chunked_logprobs(predictors, head.weight, head.bias, targets)[0]
    return lp.new_zeros(n).index_add(0, rows, lp)


__all__ = ["two_pass_logprobs"]
