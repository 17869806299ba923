"""Prefix sharing in one padding-free pass: each prompt and all its completions in one row.

Row ``p`` holds prompt ``p`` followed by every completion it owns (for pairs: prompt | chosen |
rejected, the layout of Wang et al. 2024, "Accelerating Direct Preference Optimization with
Prefix Sharing"). A completion sees the prompt and its own earlier tokens, never a sibling;
its position ids continue from the prompt's length, so each completion is computed exactly as
if it followed the prompt alone.

The rows run through the decoder *packed* (``[1, S]``, S = the real tokens only), so every
token-wise op (embeddings, norms, projections, MLP) does no padding work and the prompt is
computed once. Attention, the one op that mixes positions, is done on the padded ``[P, heads,
T, d]`` layout: :class:`GroupAttention` intercepts the decoder's SDPA calls, scatters queries,
keys and values to it, applies the block mask above and gathers the output back. There is no
KV cache, no repeat of the prompt's keys per completion and no second pass. Scatter and gather
are differentiable, so values and gradients equal the plain path.

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
class PaddedLayout:
    """Packed index ``[S']`` ↔ padded slot ``[P·T]`` of a packed decoder input, and which slot
    may attend which: what :class:`GroupAttention` needs."""

    slots: Tensor  # [S] padded slot of each real packed token
    gather: Tensor  # [S'] padded slot each packed row reads back (fillers: any slot)
    keep: Tensor  # [P, T, T] bool: query slot may attend key slot
    n_rows: int
    width: int

    @property
    def length(self) -> int:
        """S', the packed length the decoder sees (real tokens, then fillers)."""
        return int(self.gather.numel())


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
    sequence one padded row, causal attention inside it."""
    device = seq_lens.device
    width = _round_up(int(seq_lens.max()), WIDTH_MULTIPLE)
    col = torch.arange(width, device=device)
    real = col[None] < seq_lens[:, None]
    slots = torch.nonzero(real.reshape(-1)).squeeze(1)
    keep = (col[:, None] >= col[None, :])[None] & real[:, None, :]
    return PaddedLayout(slots=slots, gather=slots, keep=keep, n_rows=int(seq_lens.numel()), width=width)


def packed_sequences_hidden(decoder: nn.Module, batch: dict[str, Any]) -> Tensor:
    """The decoder's last hidden states ``[1, S, H]`` of a packed batch (``input_ids [1, S]``,
    ``position_ids`` restarting per sequence, ``seq_lens``), attention padded per sequence
    instead of transformers' dense ``[S, S]`` block mask (work ``Σ len·max len``, not ``S²``)."""
    lay = sequence_layout(torch.as_tensor(batch["seq_lens"], device=batch["input_ids"].device))
    dummy = torch.ones((), dtype=torch.bool, device=batch["input_ids"].device).expand(
        1, 1, lay.length, lay.length)
    # entered (and registered for checkpoint recomputation) in this order: the innermost mode
    # sees SDPA first, so GroupAttention must sit inside CpuAttention
    with cpu_attention(batch["input_ids"].device), recompute_with(lambda: GroupAttention(lay)), \
            GroupAttention(lay):
        return decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=dummy, use_cache=False).last_hidden_state


def group_layout(batch: dict[str, Any]) -> GroupLayout:
    """Lay a ``shared`` batch (right-padded ``prompt_ids [P, W]``, ``completion_ids [N, C]``,
    ``owner [N]``) out as rows prompt | completions of that prompt."""
    prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
    prompt_lengths, completion_mask, owner = batch["prompt_lengths"], batch["completion_mask"], batch["owner"]
    device = prompt_ids.device
    lengths, comp_lengths, owners = (t.tolist() for t in (prompt_lengths, completion_mask.sum(1), owner))
    if min(lengths, default=1) < 1:
        raise ValueError("every completion needs a non-empty prompt")
    n_rows, n = len(lengths), len(owners)
    free = list(lengths)  # next free column of each row
    start = []
    for o, c in zip(owners, comp_lengths):
        start.append(free[o])
        free[o] += c
    width = _round_up(max(free), WIDTH_MULTIPLE)
    w, c = prompt_ids.shape[1], completion_ids.shape[1]
    p_keep = torch.arange(w, device=device)[None] < prompt_lengths[:, None]
    c_keep = completion_mask.bool()
    rows = torch.arange(n_rows, device=device)
    start_t = torch.tensor(start, device=device, dtype=torch.long)
    p_slots = (rows[:, None] * width + torch.arange(w, device=device)[None])[p_keep]
    c_slots = (owner[:, None] * width + start_t[:, None] + torch.arange(c, device=device)[None])[c_keep]
    total = n_rows * width
    ids = torch.zeros(total, dtype=prompt_ids.dtype, device=device)
    pos = torch.zeros(total, dtype=torch.long, device=device)
    seg = torch.full((total,), -1, dtype=torch.long, device=device)  # -1 pad, 0 prompt, n+1
    ids[p_slots], ids[c_slots] = prompt_ids[p_keep], completion_ids[c_keep]
    pos[p_slots] = torch.arange(w, device=device)[None].expand(n_rows, w)[p_keep]
    pos[c_slots] = (prompt_lengths[owner][:, None] + torch.arange(c, device=device)[None])[c_keep]
    seg[p_slots] = 0
    seg[c_slots] = (torch.arange(n, device=device)[:, None] + 1).expand(n, c)[c_keep]
    slots = torch.nonzero(seg >= 0).squeeze(1)
    packed_of = torch.full((total,), -1, dtype=torch.long, device=device)
    packed_of[slots] = torch.arange(slots.numel(), device=device)
    s = seg.view(n_rows, width)
    col = torch.arange(width, device=device)
    keep = ((col[:, None] >= col[None, :])[None]
            & ((s[:, None, :] == 0) | (s[:, None, :] == s[:, :, None])) & (s[:, None, :] >= 0))
    # token t of completion n is predicted at slot start+t-1, its first token at the prompt's end
    t_idx = torch.arange(c, device=device)[None]
    pred_slot = owner[:, None] * width + torch.where(
        t_idx == 0, prompt_lengths[owner][:, None] - 1, start_t[:, None] + t_idx - 1)
    comp_len_t = completion_mask.sum(1)
    end_slot = owner * width + torch.where(comp_len_t > 0, start_t + comp_len_t - 1,
                                           prompt_lengths[owner] - 1)
    fill = _round_up(slots.numel(), LENGTH_MULTIPLE) - slots.numel()
    gather = torch.cat([slots, slots[:1].expand(fill)])
    return GroupLayout(
        slots=slots, gather=gather, keep=keep, n_rows=n_rows, width=width,
        input_ids=ids[gather][None], position_ids=pos[gather][None],
        predictors=packed_of[pred_slot[c_keep]],
        targets=completion_ids[c_keep],
        owners=torch.arange(n, device=device)[:, None].expand(n, c)[c_keep],
        ends=packed_of[end_slot])


class GroupAttention(TorchFunctionMode):
    """Run the decoder's packed SDPA calls as padded attention under the layout's mask."""

    def __init__(self, layout: PaddedLayout) -> None:
        super().__init__()
        self.layout = layout
        self._bias: dict[tuple, Tensor] = {}  # the same for every layer: built once per pass

    def to_padded(self, x: Tensor) -> Tensor:
        """``[1, h, S', d]`` → ``[P, h, T, d]`` with zeros in the pad slots."""
        lay = self.layout
        _, h, _, d = x.shape
        rows = x[0, :, :lay.slots.numel()].transpose(0, 1)  # [S, h, d], fillers dropped
        padded = rows.new_zeros(lay.n_rows * lay.width, h, d).index_copy(0, lay.slots, rows)
        return padded.view(lay.n_rows, lay.width, h, d).transpose(1, 2)

    def to_packed(self, x: Tensor) -> Tensor:
        """``[P, h, T, d]`` → ``[1, h, S', d]`` (filler rows read an arbitrary slot: nothing
        downstream reads them, so they get no gradient)."""
        p, h, t, d = x.shape
        return x.transpose(1, 2).reshape(p * t, h, d).index_select(0, self.layout.gather).transpose(0, 1)[None]

    def _cpu_bias(self, heads: int, dtype: torch.dtype) -> Tensor:
        key = (heads, dtype)
        if key not in self._bias:
            lay = self.layout
            self._bias[key] = mask_bias(lay.keep, dtype)[:, None].expand(
                lay.n_rows, heads, lay.width, lay.width).reshape(-1, lay.width, lay.width)
        return self._bias[key]

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
        qp, kp, vp = (self.to_padded(t) for t in (q, k, v))
        lay, heads = self.layout, q.shape[-3]
        dropout = kwargs.get("dropout_p") or 0.0
        if (q.device.type == "cpu" and not dropout
                and lay.n_rows * heads * lay.width ** 2 <= MAX_SCORES):
            out = attention_with_bias(qp, kp, vp, self._cpu_bias(heads, qp.dtype), kwargs.get("scale"))
        else:
            out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=lay.keep[:, None],
                                                 dropout_p=dropout, scale=kwargs.get("scale"))
        return self.to_packed(out)


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
    contexts = (lambda: last_layer_only_at(decoder, needed), lambda: GroupAttention(lay))
    with recompute_with(*contexts), contexts[0](), contexts[1]():
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


__all__ = ["GroupAttention", "GroupLayout", "PaddedLayout", "group_layout", "group_pass_logprobs",
           "packed_sequences_hidden", "predictor_hidden", "scored_logprobs", "sequence_end_hidden",
           "sequence_layout"]
