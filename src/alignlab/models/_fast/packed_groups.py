"""Prefix sharing in one padding-free pass: each prompt and all its completions in one row.

Row ``p`` holds prompt ``p`` followed by every completion it owns (for pairs: prompt | chosen |
rejected, the layout of Wang et al. 2024, "Accelerating Direct Preference Optimization with
Prefix Sharing"). A completion sees the prompt and its own earlier tokens, never a sibling;
its position ids continue from the prompt's length, so each completion is computed exactly as
if it followed the prompt alone.

The rows run through the decoder *packed* (``[1, S]``, S = the real tokens only), so every
token-wise op (embeddings, norms, projections, MLP) does no padding work and the prompt is
computed once. Attention, the one op that mixes positions, runs on padded blocks
(:mod:`~alignlab.models._fast.block_attention`): per bucket of similar prompt lengths, the
prompts (causal), then their completions, which attend their prompt's keys (gathered once for
all of its completions) and their own; no score against a sibling is computed. There is no KV
cache and no second pass. Gathers and writes are differentiable, so values and gradients equal
the plain path.

Only for decoders whose attention goes through SDPA (``_attn_implementation == "sdpa"``) and
whose positions come from ``position_ids``; :func:`alignlab.models.logprobs.fast_path` decides.
The decoder gets a zero-stride dummy 4D mask so that transformers builds none of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alignlab.models._fast.block_attention import (
    WIDTH_MULTIPLE,
    AttentionBlock,
    GroupAttention,
    PaddedLayout,
    PrefixedBlock,
    causal_blocks,
    causal_rows,
    length_buckets,
    round_up,
)
from alignlab.models._fast.cpu_attention import cpu_attention
from alignlab.models._fast.last_layer import last_layer_only_at
from alignlab.models.backbone import chunked_logprobs
from alignlab.models.checkpointing import recompute_with

# The packed length is rounded up to this multiple (padded row widths to
# block_attention.WIDTH_MULTIPLE). Every batch otherwise has its own matmul shapes, and the CPU
# BLAS (oneDNN) keeps kernels and buffers per shape, so peak memory grows step after step
# (benchmarks/README.md); rounded, it settles. The filler rows cost ≤ 31 tokens of a ~1000-token
# batch; filler columns only attention.
LENGTH_MULTIPLE = 32


@dataclass
class GroupLayout(PaddedLayout):
    """A ``shared`` batch's :class:`PaddedLayout` (rows prompt | completions), its packed
    decoder input and what the log-prob gather needs."""

    input_ids: Tensor  # [1, S']
    position_ids: Tensor  # [1, S']
    predictors: Tensor  # packed index of the hidden state predicting each scored token
    targets: Tensor  # the scored tokens
    owners: Tensor  # the completion each scored token belongs to
    ends: Tensor  # packed index of each prompt + completion sequence's last token [N]


def sequence_layout(seq_lens: Tensor) -> PaddedLayout:
    """The layout of a padding-free packed row ``[1, Σ seq_lens]`` (``pack_collate``): each
    sequence one padded row (rows of similar length share a block), causal attention inside it."""
    offsets = seq_lens.cumsum(0) - seq_lens
    return PaddedLayout(blocks=list(causal_blocks(offsets, seq_lens)), length=int(seq_lens.sum()))


def packed_sequences_hidden(decoder: nn.Module, batch: dict[str, Any]) -> Tensor:
    """The decoder's last hidden states ``[1, S, H]`` of a packed batch (``input_ids [1, S]``,
    ``position_ids`` restarting per sequence, ``seq_lens``), attention padded per sequence
    instead of transformers' dense ``[S, S]`` block mask (work ``Σ len·max len``, not ``S²``)."""
    lay = sequence_layout(torch.as_tensor(batch["seq_lens"], device=batch["input_ids"].device))
    dummy = torch.ones((), dtype=torch.bool, device=batch["input_ids"].device).expand(
        1, 1, lay.length, lay.length)
    # entered (and registered for checkpoint recomputation) in this order: the innermost mode
    # sees SDPA first, so GroupAttention must sit inside CpuAttention
    # the recomputation re-enters the same instance: its per-pass bias cache, built by the
    # first layer's forward, is then not rebuilt inside a later layer's selective recomputation
    attention = GroupAttention(lay)
    with cpu_attention(batch["input_ids"].device), recompute_with(lambda: attention), attention:
        return decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=dummy, use_cache=False).last_hidden_state


def _prompt_and_completion_blocks(row_off: Tensor, prompt_lengths: Tensor, comp_off: Tensor,
                                  comp_lengths: Tensor, owners: list[int]) -> list[AttentionBlock | PrefixedBlock]:
    """Per bucket of similar prompt lengths: the prompts' causal block, then the block of
    their completions (:class:`PrefixedBlock`, ``G`` = the most completions a prompt of the
    bucket owns; slots of prompts with fewer stay empty)."""
    children: list[list[int]] = [[] for _ in range(len(prompt_lengths))]
    for n, o in enumerate(owners):
        children[o].append(n)
    prompt_blocks: list[AttentionBlock] = []
    completion_blocks: list[PrefixedBlock] = []
    for bucket in length_buckets(prompt_lengths.tolist()):
        idx = torch.tensor(bucket, device=row_off.device)
        prompt_blocks.append(causal_rows(row_off[idx], prompt_lengths[idx]))
        group = max(len(children[p]) for p in bucket)
        own = [n for p in bucket for n in children[p]]
        longest = int(comp_lengths[own].max()) if own else 0
        if longest == 0:  # no completion token to attend from
            continue
        table = torch.full((len(bucket), group), -1, dtype=torch.long)
        for row, p in enumerate(bucket):
            table[row, :len(children[p])] = torch.tensor(children[p], dtype=torch.long)
        table = table.to(row_off.device)
        slot = table.clamp_min(0)
        col = torch.arange(round_up(longest, WIDTH_MULTIPLE), device=row_off.device)
        real = (table >= 0)[..., None] & (col < comp_lengths[slot][..., None])
        queries = (comp_off[slot][..., None] + col) * real
        completion_blocks.append(PrefixedBlock(
            queries=queries.reshape(len(bucket), -1), real=real.reshape(len(bucket), -1), group=group,
            prefix=len(prompt_blocks) - 1, prefix_real=prompt_blocks[-1].real))
    return [*prompt_blocks, *completion_blocks]


def group_layout(batch: dict[str, Any]) -> GroupLayout:
    """Lay a ``shared`` batch (right-padded ``prompt_ids [P, W]``, ``completion_ids [N, C]``,
    ``owner [N]``) out as packed rows prompt | completions of that prompt.

    Attention runs in blocks (:mod:`~alignlab.models._fast.block_attention`), per bucket of
    similar prompt lengths: the prompts, causal, one padded row each; and their completions,
    which attend their prompt's keys and their own. A completion never computes scores against
    its siblings, nor a prompt token against any completion: a group's padded square of
    (prompt + G completions)² scores shrinks to prompt² + G·completion·(prompt + completion)."""
    prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
    prompt_lengths, completion_mask, owner = batch["prompt_lengths"], batch["completion_mask"], batch["owner"]
    device = prompt_ids.device
    lengths, comp_lengths, owners = (t.tolist() for t in (prompt_lengths, completion_mask.sum(1), owner))
    if min(lengths, default=1) < 1:
        raise ValueError("every completion needs a non-empty prompt")
    n = len(owners)
    free = list(lengths)  # next free column of each row
    start = []
    for o, c in zip(owners, comp_lengths):
        start.append(free[o])
        free[o] += c
    row_len = torch.tensor(free, device=device, dtype=torch.long)
    row_off = row_len.cumsum(0) - row_len
    total = int(row_len.sum())
    w, c = prompt_ids.shape[1], completion_ids.shape[1]
    p_keep = torch.arange(w, device=device)[None] < prompt_lengths[:, None]
    c_keep = completion_mask.bool()
    start_t = torch.tensor(start, device=device, dtype=torch.long)
    comp_off = row_off[owner] + start_t  # packed index of each completion's first token
    p_idx = (row_off[:, None] + torch.arange(w, device=device)[None])[p_keep]
    c_idx = (comp_off[:, None] + torch.arange(c, device=device)[None])[c_keep]
    length = round_up(total, LENGTH_MULTIPLE)
    ids = torch.zeros(length, dtype=prompt_ids.dtype, device=device)
    pos = torch.zeros(length, dtype=torch.long, device=device)
    ids[p_idx], ids[c_idx] = prompt_ids[p_keep], completion_ids[c_keep]
    pos[p_idx] = torch.arange(w, device=device)[None].expand(len(lengths), w)[p_keep]
    pos[c_idx] = (prompt_lengths[owner][:, None] + torch.arange(c, device=device)[None])[c_keep]
    ids[total:] = ids[0]  # fillers repeat the first token (position 0); nothing reads them

    comp_len_t = completion_mask.sum(1)
    blocks = _prompt_and_completion_blocks(row_off, prompt_lengths, comp_off, comp_len_t, owners)

    # token t of completion n is predicted at index off+t-1, its first token at the prompt's end
    t_idx = torch.arange(c, device=device)[None]
    pred = torch.where(t_idx == 0, (row_off[owner] + prompt_lengths[owner] - 1)[:, None],
                       comp_off[:, None] + t_idx - 1)
    end = torch.where(comp_len_t > 0, comp_off + comp_len_t - 1,
                      row_off[owner] + prompt_lengths[owner] - 1)
    return GroupLayout(
        blocks=blocks, length=length,
        input_ids=ids[None], position_ids=pos[None], predictors=pred[c_keep],
        targets=completion_ids[c_keep],
        owners=torch.arange(n, device=device)[:, None].expand(n, c)[c_keep], ends=end)


def _rounded_rows(index: Tensor, total: int) -> Tensor:
    """The sorted distinct rows ``index`` plus the first other rows, up to a multiple of
    :data:`LENGTH_MULTIPLE` (at most ``total``): a shape that repeats across batches."""
    index = torch.unique(index)
    extra = min(round_up(index.numel(), LENGTH_MULTIPLE), total) - index.numel()
    if extra:
        free = torch.ones(total, dtype=torch.bool, device=index.device)
        free[index] = False
        index = torch.sort(torch.cat([index, torch.nonzero(free).squeeze(1)[:extra]])).values
    return index


def _hidden_at(decoder: nn.Module, lay: GroupLayout, rows: Tensor) -> Tensor:
    """One packed pass of ``lay``: the decoder's last hidden state at packed ``rows``."""
    if rows.numel() == 0:
        width = getattr(getattr(decoder, "config", None), "hidden_size", 0)
        return torch.zeros(0, width, device=lay.input_ids.device)
    # the last layer runs its query/output projections and MLP only where a hidden state is read
    needed = _rounded_rows(rows, lay.length)
    dummy = torch.ones((), dtype=torch.bool, device=lay.input_ids.device).expand(1, 1, lay.length, lay.length)
    attention = GroupAttention(lay)  # one instance, re-entered by the recomputation (above)
    contexts = (lambda: last_layer_only_at(decoder, needed), lambda: attention)
    with recompute_with(*contexts), contexts[0](), attention:
        hidden = decoder(input_ids=lay.input_ids, position_ids=lay.position_ids,
                         attention_mask=dummy, use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)


def predictor_hidden(decoder: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, GroupLayout]:
    """One packed pass over a ``shared`` batch: the decoder's last hidden state at the position
    that predicts each completion token (row-major), ``[n scored, H]``, and the layout."""
    lay = group_layout(batch)
    return _hidden_at(decoder, lay, lay.predictors), lay


def sequence_end_hidden(decoder: nn.Module, batch: dict[str, Any]) -> Tensor:
    """One packed pass over a ``shared`` batch: the hidden state at the last token of each
    prompt + completion sequence, ``[N, H]`` (a reward model reads its reward there)."""
    lay = group_layout(batch)
    return _hidden_at(decoder, lay, lay.ends)


def scored_logprobs(decoder: nn.Module, head: nn.Module, batch: dict[str, Any], *,
                    temperature: float = 1.0, with_entropy: bool = False
                    ) -> tuple[Tensor, Tensor | None, GroupLayout]:
    """``(log p, entropy or None, layout)`` of every completion token of a ``shared`` batch,
    row-major (completion by completion, token by token), float32, under
    ``softmax(logits / temperature)``."""
    hidden, lay = predictor_hidden(decoder, batch)
    scored = hidden.shape[0]
    if scored == 0:
        zero = torch.zeros(0, device=lay.input_ids.device)
        return zero, (zero if with_entropy else None), lay
    fill = round_up(scored, LENGTH_MULTIPLE) - scored  # repeated rows, dropped below
    rows = torch.cat([hidden, hidden[:1].expand(fill, -1)])
    targets = torch.cat([lay.targets, lay.targets[:1].expand(fill)])
    lp, ent = chunked_logprobs(rows, head.weight, head.bias, targets, temperature=temperature,
                               with_entropy=with_entropy)
    return lp[:scored], (ent[:scored] if with_entropy else None), lay


def group_pass_logprobs(decoder: nn.Module, head: nn.Module, batch: dict[str, Any], *,
                        per_token: bool = False) -> Tensor:
    """Per-completion log-prob sums ``[N]`` (float32) of a ``shared`` batch in one packed pass;
    ``per_token``: ``[N, max length]`` per-token log-probs instead (0 beyond each completion)."""
    lp, _, lay = scored_logprobs(decoder, head, batch)
    if per_token:
        mask = batch["completion_mask"].bool()
        out = lp.new_zeros(mask.shape).masked_scatter(mask, lp)  # scored tokens are row-major
        return out[:, :int(batch["completion_lengths"].max())]  # as wide as the longest
    n = batch["completion_ids"].shape[0]
    return lp.new_zeros(n).index_add(0, lay.owners, lp)


__all__ = ["GroupLayout", "group_layout", "group_pass_logprobs",
           "packed_sequences_hidden", "predictor_hidden", "scored_logprobs", "sequence_end_hidden",
           "sequence_layout"]
