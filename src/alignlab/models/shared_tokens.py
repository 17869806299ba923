"""Per-token log-probs of a flat batch with prompt-prefix sharing and no padding work.

Online RL batches (``RolloutRole.to_batch``) hold each prompt once per sampled completion —
G times for GRPO's groups — each row right-padded to the longest. Here such a batch is viewed
as groups (every distinct prompt once, with the completions that follow it) and run through the
one-pass prefix sharing of :mod:`alignlab.models.packed_groups`; the values come back in the
flat ``[B, T]`` layout of :func:`alignlab.models.logprobs.token_logprobs`, equal to it up to
float rounding (tested), so everything downstream (ratios, advantages, KL) is unchanged.

It applies when the model qualifies for the one-pass prefix sharing (an SDPA decoder with a
plain output head) and every row is right-padded with its ``loss_mask`` one block that ends at
the row's last real token after a non-empty prompt; otherwise callers fall back to
``token_logprobs``. A scalar-head critic's per-token values come the same way
(:func:`shared_state_values`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alignlab.models.cpu_attention import cpu_attention
from alignlab.models.logprobs import find_backbone_and_head, token_logprobs
from alignlab.models.packed_groups import (decoder_takes_group_pass, group_pass_applies,
                                           predictor_hidden, scored_logprobs, sequence_end_hidden)
from alignlab.models.prefix_sharing import body_supports_prefix_sharing


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


# Sharing pays for its fixed per-pass cost (grouping, scatter/gather per layer) only when it
# skips enough token positions. Measured on the tiny world (2 layers): arithmetic micro-batches of
# 32 rows x ~13 tokens (~250 positions skipped) ran 15% slower shared; the GRPO benchmark's
# 32 x ~56 (~800 skipped) ran its update 45% faster.
MIN_SKIPPED_TOKENS = 512


def sharing_worth_it(model: nn.Module, batch: dict[str, Any], groups: dict[str, Tensor],
                     min_skipped_tokens: int = MIN_SKIPPED_TOKENS) -> bool:
    """Whether a causal LM takes the one-pass prefix sharing and ``groups`` (from
    :func:`as_groups`) skips at least ``min_skipped_tokens`` positions of ``batch``."""
    # group_pass_applies already requires the decoder + plain head that prefix_sharing_support does
    return (group_pass_applies(model) and body_supports_prefix_sharing(model)[0]
            and _skipped(batch, groups) >= min_skipped_tokens)


def shared_token_logprobs(model: nn.Module, batch: dict[str, Any], *, temperature: float = 1.0,
                          return_entropy: bool = False, min_skipped_tokens: int = MIN_SKIPPED_TOKENS
                          ) -> Tensor | tuple[Tensor, Tensor] | None:
    """:func:`~alignlab.models.logprobs.token_logprobs` of ``batch`` by prefix sharing, or None
    where it does not apply or would skip fewer than ``min_skipped_tokens`` positions (repeated
    prompts and padding) of the flat batch."""
    groups = as_groups(batch)
    if groups is None or not sharing_worth_it(model, batch, groups, min_skipped_tokens):
        return None
    with cpu_attention(batch["input_ids"].device):
        lp, ent, _ = scored_logprobs(*find_backbone_and_head(model), groups,
                                     temperature=temperature, with_entropy=return_entropy)
    scored = batch["loss_mask"].bool()  # completion tokens, row-major: the order of ``lp``
    out = lp.new_zeros(scored.shape).masked_scatter(scored, lp)
    if not return_entropy:
        return out
    return out, ent.new_zeros(scored.shape).masked_scatter(scored, ent)


def shared_state_values(critic: nn.Module, batch: dict[str, Any], *,
                        min_skipped_tokens: int = MIN_SKIPPED_TOKENS) -> Tensor | None:
    """A scalar-head critic's ``V(s_t)`` at every completion token of ``batch`` (``[B, T]``,
    0 elsewhere), read from the hidden state that predicts the token, by prefix sharing; None
    where it does not apply (then compute ``critic(batch)`` and shift it)."""
    found = _scalar_head_groups(critic, batch, min_skipped_tokens)
    if found is None or found[1].out_features != 1:
        return None
    backbone, head, groups = found
    with cpu_attention(batch["input_ids"].device):
        hidden, _ = predictor_hidden(backbone, groups)
    values = head(hidden.float()).squeeze(-1)
    return values.new_zeros(batch["loss_mask"].shape).masked_scatter(batch["loss_mask"].bool(), values)


def shared_sequence_values(model: nn.Module, batch: dict[str, Any], *,
                           min_skipped_tokens: int = MIN_SKIPPED_TOKENS) -> Tensor | None:
    """A scalar-head model's value at each row's last token (``[B]``, ``[B, K]`` with K heads),
    each distinct prompt computed once; None where prefix sharing does not apply."""
    found = _scalar_head_groups(model, batch, min_skipped_tokens)
    if found is None:
        return None
    backbone, head, groups = found
    with cpu_attention(batch["input_ids"].device):
        hidden = sequence_end_hidden(backbone, groups)
    values = head(hidden.float())
    return values.squeeze(-1) if head.out_features == 1 else values


def _scalar_head_groups(model: nn.Module, batch: dict[str, Any], min_skipped_tokens: int
                        ) -> tuple[nn.Module, nn.Linear, dict[str, Tensor]] | None:
    """``(backbone, head, groups)`` of a scalar-head model (``CausalLMWithScalarHead``) whose
    body takes the one-pass prefix sharing on ``batch`` with enough skipped positions."""
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if (backbone is None or not isinstance(head, nn.Linear) or not decoder_takes_group_pass(backbone)
            or not body_supports_prefix_sharing(backbone)[0]):
        return None
    groups = as_groups(batch)
    if groups is None or _skipped(batch, groups) < min_skipped_tokens:
        return None
    return backbone, head, groups


def _skipped(batch: dict[str, Any], groups: dict[str, Tensor]) -> int:
    """Positions of the flat batch the shared pass does not compute (repeats and padding)."""
    packed = int(groups["prompt_lengths"].sum()) + int(groups["completion_lengths"].sum())
    return batch["input_ids"].numel() - packed


def grouped_token_logprobs(model: nn.Module, batch: dict[str, Any], *, temperature: float = 1.0,
                           return_entropy: bool = False, prefix_sharing: bool = True
                           ) -> Tensor | tuple[Tensor, Tensor]:
    """``token_logprobs`` of ``batch``, by prefix sharing where it applies (and is wanted)."""
    if prefix_sharing:
        out = shared_token_logprobs(model, batch, temperature=temperature,
                                    return_entropy=return_entropy)
        if out is not None:
            return out
    return token_logprobs(model, batch, temperature=temperature, return_entropy=return_entropy)


__all__ = ["MIN_SKIPPED_TOKENS", "as_groups", "grouped_token_logprobs", "shared_sequence_values",
           "shared_state_values", "shared_token_logprobs", "sharing_worth_it"]
