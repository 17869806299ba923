"""Prefix sharing in one padding-free pass: each prompt and all its completions in one row.

Row ``p`` holds prompt ``p`` followed by every completion it owns (for pairs: prompt | chosen |
rejected, the layout of Wang et al. 2024, "Accelerating Direct Preference Optimization with
Prefix Sharing"). A completion sees the prompt and its own earlier tokens, never a sibling;
its position ids continue from the prompt's length, so each completion is computed exactly as
if it followed the prompt alone.

The rows run through the decoder *packed* (``[1, S]``, S = the real tokens only), so every
token-wise op (embeddings, norms, projections, MLP) does no padding work and the prompt is
computed once. Attention, the one op that mixes positions, runs on padded blocks:
:class:`GroupAttention` intercepts the decoder's SDPA calls and, per :class:`AttentionBlock`,
gathers queries, keys and values into padded rows, attends under the block's mask and writes
the outputs back. A ``shared`` batch has two blocks: the prompts (causal), and the completions,
each a row whose keys are its prompt's and its own (the prompt's keys are gathered once per
completion; no score against a sibling is computed). There is no KV cache and no second pass.
Gathers and writes are differentiable, so values and gradients equal the plain path.

Only for decoders whose attention goes through SDPA (``_attn_implementation == "sdpa"``) and
whose positions come from ``position_ids``; :func:`alignlab.models.logprobs.fast_path` decides.
The decoder gets a zero-stride dummy 4D mask so that transformers builds none of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from alignlab.models._fast.cpu_attention import (
    MAX_SCORES,
    attention_with_bias,
    causal_bias,
    cpu_attention,
    mask_bias,
)
from alignlab.models._fast.last_layer import last_layer_only_at
from alignlab.models.backbone import chunked_logprobs
from alignlab.models.checkpointing import recompute_with

# The packed length and the padded row width are rounded up to these multiples. Every batch
# otherwise has its own matmul shapes, and the CPU BLAS (oneDNN) keeps kernels and buffers per
# shape, so peak memory grows step after step (benchmarks/README.md); rounded, it settles. The
# filler rows cost ≤ 31 tokens of a ~1000-token batch; filler columns only attention.
LENGTH_MULTIPLE = 32
WIDTH_MULTIPLE = 16


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass
class AttentionBlock:
    """``R`` padded rows of queries, each attending keys of its own row, named by packed index.

    Pad slots hold index 0 (any real token: its value is masked out or its output unread)."""

    queries: Tensor  # [R, Wq] packed index of each query slot
    real: Tensor  # [R, Wq] bool: query slots that hold a token (their outputs are written back)
    keys: Tensor | None = None  # [R, Wk]; None: the queries' own slots, causal (top-left)
    keep: Tensor | None = None  # [R, Wq, Wk] bool: query slot may attend key slot (with keys)

    def __post_init__(self) -> None:
        self.dest = self.queries[self.real]  # where the outputs go, row-major

    @property
    def key_index(self) -> Tensor:
        return self.queries if self.keys is None else self.keys


@dataclass
class PaddedLayout:
    """A packed decoder input of ``length`` tokens (real tokens, then fillers) and the padded
    attention blocks that cover every real token's query: what :class:`GroupAttention` needs."""

    blocks: list[AttentionBlock]
    length: int  # S', the packed length the decoder sees


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


def _causal_rows(offsets: Tensor, lengths: Tensor) -> AttentionBlock:
    """One causal row per sequence of ``lengths`` tokens starting at packed ``offsets``."""
    col = torch.arange(_round_up(int(lengths.max()), WIDTH_MULTIPLE), device=lengths.device)
    real = col[None] < lengths[:, None]
    return AttentionBlock(queries=(offsets[:, None] + col[None]) * real, real=real)


def sequence_layout(seq_lens: Tensor) -> PaddedLayout:
    """The layout of a padding-free packed row ``[1, Σ seq_lens]`` (``pack_collate``): each
    sequence one padded row, causal attention inside it."""
    offsets = seq_lens.cumsum(0) - seq_lens
    return PaddedLayout(blocks=[_causal_rows(offsets, seq_lens)], length=int(seq_lens.sum()))


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


def group_layout(batch: dict[str, Any]) -> GroupLayout:
    """Lay a ``shared`` batch (right-padded ``prompt_ids [P, W]``, ``completion_ids [N, C]``,
    ``owner [N]``) out as packed rows prompt | completions of that prompt.

    Attention runs in two blocks (:class:`AttentionBlock`): the prompts, causal, one padded row
    each; and the completions, one padded row each whose keys are its prompt's tokens and its
    own. A completion never computes scores against its siblings, nor a prompt token against
    any completion: a group's padded square of (prompt + G completions)² scores shrinks to
    prompt² + G·completion·(prompt + completion)."""
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
    length = _round_up(total, LENGTH_MULTIPLE)
    ids = torch.zeros(length, dtype=prompt_ids.dtype, device=device)
    pos = torch.zeros(length, dtype=torch.long, device=device)
    ids[p_idx], ids[c_idx] = prompt_ids[p_keep], completion_ids[c_keep]
    pos[p_idx] = torch.arange(w, device=device)[None].expand(len(lengths), w)[p_keep]
    pos[c_idx] = (prompt_lengths[owner][:, None] + torch.arange(c, device=device)[None])[c_keep]
    ids[total:] = ids[0]  # fillers repeat the first token (position 0); nothing reads them

    prompts = _causal_rows(row_off, prompt_lengths)
    comp_len_t = completion_mask.sum(1)
    completions = _causal_rows(comp_off, comp_len_t)
    wc = completions.queries.shape[1]
    own = completions.real[:, None, :] & torch.ones(wc, wc, dtype=torch.bool, device=device).tril()[None]
    completions.keys = torch.cat([prompts.queries[owner], completions.queries], 1)
    completions.keep = torch.cat([prompts.real[owner][:, None, :].expand(n, wc, -1), own], 2)

    # token t of completion n is predicted at index off+t-1, its first token at the prompt's end
    t_idx = torch.arange(c, device=device)[None]
    pred = torch.where(t_idx == 0, (row_off[owner] + prompt_lengths[owner] - 1)[:, None],
                       comp_off[:, None] + t_idx - 1)
    end = torch.where(comp_len_t > 0, comp_off + comp_len_t - 1,
                      row_off[owner] + prompt_lengths[owner] - 1)
    return GroupLayout(
        blocks=[prompts, completions], length=length,
        input_ids=ids[None], position_ids=pos[None], predictors=pred[c_keep],
        targets=completion_ids[c_keep],
        owners=torch.arange(n, device=device)[:, None].expand(n, c)[c_keep], ends=end)


class GroupAttention(TorchFunctionMode):
    """Run the decoder's packed SDPA calls block by block (:class:`PaddedLayout`): gather each
    block's queries, keys and values into padded rows, attend under its mask, and write the
    outputs back to their packed slots (fillers get zeros: nothing reads them). Gathers and
    writes are differentiable."""

    def __init__(self, layout: PaddedLayout) -> None:
        super().__init__()
        self.layout = layout
        self._bias: dict[tuple, Tensor] = {}  # the same for every layer: built once per pass

    @staticmethod
    def _gather(rows: Tensor, index: Tensor) -> Tensor:
        """``rows [S', h, d]`` at ``index [R, W]`` → ``[R, h, W, d]``."""
        r, w = index.shape
        return rows.index_select(0, index.reshape(-1)).view(r, w, *rows.shape[1:]).transpose(1, 2)

    def _cpu_bias(self, i: int, block: AttentionBlock, heads: int, dtype: torch.dtype) -> Tensor:
        key = (i, heads, dtype)
        if key not in self._bias:
            wq = block.queries.shape[1]
            if block.keep is None:
                self._bias[key] = causal_bias(wq, wq, dtype, block.queries.device)
            else:
                r, _, wk = block.keep.shape
                self._bias[key] = mask_bias(block.keep, dtype)[:, None].expand(
                    r, heads, wq, wk).reshape(-1, wq, wk)
        return self._bias[key]

    def _attend(self, i: int, block: AttentionBlock, q: Tensor, k: Tensor, v: Tensor,
                dropout: float, scale: float | None) -> Tensor:
        r, heads, wq, _ = q.shape
        if q.device.type == "cpu" and not dropout and r * heads * wq * k.shape[-2] <= MAX_SCORES:
            return attention_with_bias(q, k, v, self._cpu_bias(i, block, heads, q.dtype), scale)
        if block.keep is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                                  scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=block.keep[:, None],
                                              dropout_p=dropout, scale=scale)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        named = ("query", "key", "value")
        q, k, v = (args[i] if i < len(args) else kwargs[name] for i, name in enumerate(named))
        if not (q.dim() == 4 and q.shape[0] == 1 and q.shape[-2] == self.layout.length):
            raise RuntimeError(f"prefix-sharing pass: attention on {tuple(q.shape)} is not the "
                               f"packed batch of {self.layout.length} tokens")
        if k.shape[-3] != q.shape[-3]:  # grouped-query heads
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        qr, kr, vr = (t[0].transpose(0, 1) for t in (q, k, v))  # [S', h, d]
        out = vr.new_zeros(qr.shape[0], qr.shape[1], vr.shape[-1])
        for i, block in enumerate(self.layout.blocks):
            keys = block.key_index
            o = self._attend(i, block, self._gather(qr, block.queries), self._gather(kr, keys),
                             self._gather(vr, keys), kwargs.get("dropout_p") or 0.0,
                             kwargs.get("scale"))
            out = out.index_copy(0, block.dest, o.transpose(1, 2)[block.real])
        return out.transpose(0, 1)[None]


def _rounded_rows(index: Tensor, total: int) -> Tensor:
    """The sorted distinct rows ``index`` plus the first other rows, up to a multiple of
    :data:`LENGTH_MULTIPLE` (at most ``total``): a shape that repeats across batches."""
    index = torch.unique(index)
    extra = min(_round_up(index.numel(), LENGTH_MULTIPLE), total) - index.numel()
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
    fill = _round_up(scored, LENGTH_MULTIPLE) - scored  # repeated rows, dropped below
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


__all__ = ["AttentionBlock", "GroupAttention", "GroupLayout", "PaddedLayout", "group_layout", "group_pass_logprobs",
           "packed_sequences_hidden", "predictor_hidden", "scored_logprobs", "sequence_end_hidden",
           "sequence_layout"]
