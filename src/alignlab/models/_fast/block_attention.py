"""Attention of a packed row ``[1, S']`` run block by block on padded rows.

A packed pass (:mod:`alignlab.models._fast.packed_groups`) holds many sequences in one row, so
attention must not mix them. :class:`GroupAttention` intercepts the decoder's SDPA calls and
runs them per block of a :class:`PaddedLayout`:

- :class:`AttentionBlock`: causal rows, one per sequence (a prompt, or a packed sequence),
  padded to the block's width. :func:`causal_blocks` buckets rows of similar length, so a
  128-token prompt is not padded to its batch's 512 (causal work grows with width²).
- :class:`PrefixedBlock`: the completions of an attention block's prompts, one row per prompt
  holding its ``G`` completions side by side. Each completion attends its prompt (the keys and
  values already gathered for that prompt block, shared by its ``G`` completions, never copied
  per completion) and its own earlier tokens, never a sibling. The two score sets are joined
  for one softmax.

Head-major throughout: the decoder's ``[1, h, S', d]`` inputs are gathered along the token axis
into ``[h, R, W, d]`` (contiguous ``d``-vectors), which the matmuls and SDPA take with
``(h, R)`` as batch dims; row-major ``[R, h, W, d]`` needed a strided copy of every gathered
key and value, on CPU slower than the attention it fed (benchmarks/README.md). On CPU without
dropout the blocks run as explicit matmuls (:func:`attention_with_bias`, faster there than the
flash kernel at these sizes, in both precisions); above ``cpu_attention.MAX_SCORE_BYTES`` of
scores with autograd, with dropout, and on GPUs they go to SDPA with the block's mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from alignlab.core.runtime import autocast_dtype
from alignlab.models._fast.cpu_attention import (
    attention_with_bias,
    causal_bias,
    fits,
    mask_bias,
)

# Padded row widths are rounded up to this multiple, so shapes repeat across batches (the CPU
# BLAS keeps kernels and buffers per shape; packed_groups.LENGTH_MULTIPLE says more).
WIDTH_MULTIPLE = 16
# A bucket of causal rows may pad a row to at most this much of its own attention work (width²).
BUCKET_SLACK = 1.5


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass
class AttentionBlock:
    """``R`` padded causal rows of queries, each attending its own row's earlier slots (top-left
    aligned), named by packed index. Pad slots hold index 0 (any real token: its output is
    unread, and as a key it sits after every real query of its row)."""

    queries: Tensor  # [R, W] packed index of each slot
    real: Tensor  # [R, W] bool: slots that hold a token (their outputs are written back)
    dest: Tensor = field(init=False)  # packed index of each real slot, row-major

    def __post_init__(self) -> None:
        self.dest = self.queries[self.real]


@dataclass
class PrefixedBlock:
    """The completions of the prompts of ``blocks[prefix]`` (an :class:`AttentionBlock`, same
    row order): row ``r`` holds prompt ``r``'s ``group`` completion slots of width ``Wc`` side
    by side. A completion attends its prompt's real tokens and, causally, its own tokens."""

    queries: Tensor  # [R, group · Wc] packed index of each slot (index 0 where padding)
    real: Tensor  # [R, group · Wc] bool
    group: int
    prefix: int  # the prompt block's index in the layout's blocks
    prefix_real: Tensor  # [R, Wp] the prompt block's real key slots
    dest: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.dest = self.queries[self.real]


@dataclass
class PaddedLayout:
    """A packed decoder input of ``length`` tokens (real tokens, then fillers) and the padded
    attention blocks that cover every real token's query exactly once (prompt blocks before the
    prefixed blocks that read them)."""

    blocks: list[AttentionBlock | PrefixedBlock]
    length: int  # S', the packed length the decoder sees


def causal_rows(offsets: Tensor, lengths: Tensor) -> AttentionBlock:
    """One causal row per sequence of ``lengths`` tokens starting at packed ``offsets``, padded
    to the longest, rounded up to :data:`WIDTH_MULTIPLE`."""
    col = torch.arange(round_up(int(lengths.max()), WIDTH_MULTIPLE), device=lengths.device)
    real = col[None] < lengths[:, None]
    return AttentionBlock(queries=(offsets[:, None] + col[None]) * real, real=real)


def length_buckets(lengths: list[int]) -> list[list[int]]:
    """Indices of ``lengths`` in buckets of similar width, longest first: a bucket takes the
    next shorter row while the bucket's width² stays within :data:`BUCKET_SLACK` of the row's
    own (prompts of 128–512 tokens all padded to 512 would do ~2.3× the real work)."""
    widths = [round_up(n, WIDTH_MULTIPLE) for n in lengths]
    buckets: list[list[int]] = []
    for i in sorted(range(len(widths)), key=lambda i: -widths[i]):
        if buckets and widths[buckets[-1][0]] ** 2 <= BUCKET_SLACK * widths[i] ** 2:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def causal_blocks(offsets: Tensor, lengths: Tensor) -> list[AttentionBlock]:
    """:func:`causal_rows` per :func:`length_buckets` bucket."""
    out = []
    for bucket in length_buckets(lengths.tolist()):
        idx = torch.tensor(bucket, device=lengths.device)
        out.append(causal_rows(offsets[idx], lengths[idx]))
    return out


class GroupAttention(TorchFunctionMode):
    """Run the decoder's packed SDPA calls block by block (:class:`PaddedLayout`): gather each
    block's queries, keys and values into padded rows, attend under its mask, and write the
    outputs back to their packed slots (fillers get zeros: nothing reads them). Gathers and
    writes are differentiable."""

    def __init__(self, layout: PaddedLayout) -> None:
        super().__init__()
        self.layout = layout
        # biases, masks and gather indices, the same for every layer: built once per pass
        self._masks: dict[tuple, Any] = {}

    def _indices(self, heads: int) -> tuple[Tensor, list[int], Tensor]:
        """The pass's two gathers over the flattened ``[heads · S', d]`` rows, built once:

        - ``into``: every block's slots, block after block, each block head-major
          (``[heads, R, W]`` flattened), so that block ``i`` is the ``i``-th piece of
          ``sizes`` of the gathered rows and views as ``[heads, R, W, d]``;
        - ``back``: for each of the ``heads · S'`` packed (head, token) rows, the row of the
          concatenated block outputs holding it; fillers read the extra zero row at the end.

        One gather per q, k, v and one back, instead of one per block: the backward of each
        gather is an ``index_add`` into zeros of the whole ``[heads · S', d]``, and per block
        autograd summed as many full-size gradients (the DPO benchmark's batches: attention
        forward and backward 80 → 66 ms a layer in bf16; benchmarks/README.md)."""
        return self._cached(("indices", heads), lambda: self._build_indices(heads))

    def _build_indices(self, heads: int) -> tuple[Tensor, list[int], Tensor]:
        length = self.layout.length
        head = torch.arange(heads, device=self.layout.blocks[0].queries.device)[:, None]
        into, sizes = [], []
        back = torch.full((heads * length,), -1, dtype=torch.long, device=head.device)
        offset = 0
        for b in self.layout.blocks:
            slots = b.queries.reshape(-1)
            into.append((head * length + slots[None]).reshape(-1))
            sizes.append(heads * slots.numel())
            real = b.real.reshape(-1).nonzero().squeeze(1)  # row-major, as b.dest
            back[(head * length + b.dest[None]).reshape(-1)] = (offset + head * slots.numel() + real[None]).reshape(-1)
            offset += sizes[-1]
        return torch.cat(into), sizes, back.masked_fill_(back < 0, offset)

    def _cached(self, key: tuple, build) -> Any:
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    @staticmethod
    def _matmul_ok(q: Tensor, keys: int, dropout: float) -> bool:
        """CPU, no dropout, and within :data:`~alignlab.models._fast.cpu_attention.MAX_SCORE_BYTES`
        unless without autograd (then :func:`attention_with_bias` runs in cache-sized slices, so
        any size fits)."""
        return q.device.type == "cpu" and not dropout and (not torch.is_grad_enabled() or fits(q, keys))

    def _causal(self, i: int, q: Tensor, k: Tensor, v: Tensor, dropout: float,
                scale: float | None) -> Tensor:
        w = q.shape[-2]
        if self._matmul_ok(q, w, dropout):
            bias = self._cached((i, q.dtype), lambda: causal_bias(w, w, q.dtype, q.device))
            return attention_with_bias(q, k, v, bias, scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)

    def _prefixed(self, i: int, block: PrefixedBlock, q: Tensor, own_k: Tensor, own_v: Tensor,
                  kp: Tensor, vp: Tensor, dropout: float, scale: float | None) -> Tensor:
        """``q [h, R, G·Wc, d]`` against the prompt's ``kp, vp [h, R, Wp, d]`` and its own
        ``own_k, own_v [h, R·G, Wc, d]``; returns ``[h, R, G·Wc, d]``."""
        h, r, gw, d = q.shape
        g, wp = block.group, kp.shape[-2]
        wc = gw // g
        if not self._matmul_ok(q, wp + wc, dropout):  # SDPA on the completions' full key rows
            keys = torch.cat([kp[:, :, None].expand(h, r, g, wp, d).reshape(h, r * g, wp, d), own_k], 2)
            values = torch.cat([vp[:, :, None].expand(h, r, g, wp, -1).reshape(h, r * g, wp, -1), own_v], 2)
            keep = self._cached(("keep", i), lambda: torch.cat([
                block.prefix_real[:, None, None].expand(r, g, wc, wp).reshape(r * g, wc, wp),
                torch.ones(wc, wc, dtype=torch.bool, device=q.device).tril().expand(r * g, wc, wc)], 2))
            out = F.scaled_dot_product_attention(q.reshape(h, r * g, wc, d), keys, values,
                                                 attn_mask=keep[None], dropout_p=dropout, scale=scale)
            return out.reshape(h, r, gw, -1)
        alpha = scale if scale is not None else d ** -0.5
        pad = self._cached(("prefix", i, h, q.dtype), lambda: mask_bias(block.prefix_real, q.dtype)[None]
                           .expand(h, r, wp).reshape(h * r, 1, wp))
        causal = self._cached(("own", wc, q.dtype), lambda: causal_bias(wc, wc, q.dtype, q.device))
        # the scores against the prompt, shared by its G completions' queries in one matmul
        to_prompt = torch.baddbmm(pad, q.reshape(h * r, gw, d), kp.reshape(h * r, wp, d).transpose(1, 2),
                                  alpha=alpha)
        q_own = q.reshape(h * r * g, wc, d)
        to_own = torch.baddbmm(causal, q_own, own_k.reshape(h * r * g, wc, d).transpose(1, 2), alpha=alpha)
        probs = torch.softmax(torch.cat([to_prompt.view(h * r * g, wc, wp), to_own], -1), dim=-1)
        out = torch.bmm(probs[..., :wp].reshape(h * r, gw, wp), vp.reshape(h * r, wp, -1))
        out = out.view(h * r * g, wc, -1) + torch.bmm(probs[..., wp:], own_v.reshape(h * r * g, wc, -1))
        return out.view(h, r, gw, -1)

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
        # Under autocast SDPA would run in the autocast dtype; this mode sees the call before
        # autocast does, with RoPE's float32 outputs. Cast once here, or every gather below moves
        # float32 and every matmul casts its gathered copy again. Contiguous [h, S', d]: RoPE's
        # outputs keep the projections' token-major strides, and each gather would copy first.
        dtype = autocast_dtype(q.device)
        # (.to(memory_format=...) would return a strided input as is when its dtype matches)
        qh, kh, vh = (t[0].to(dtype or t.dtype).contiguous() for t in (q, k, v))
        heads, dv = vh.shape[0], vh.shape[-1]
        dropout, scale = kwargs.get("dropout_p") or 0.0, kwargs.get("scale")
        into, sizes, back = self._indices(heads)
        length = qh.shape[1]
        # every block's padded rows, gathered at once, as views [h, R, W, d] of the pieces
        qs, ks, vs = (t.reshape(heads * length, -1).index_select(0, into).split(sizes) for t in (qh, kh, vh))
        gathered: dict[int, tuple[Tensor, Tensor]] = {}  # prompt blocks' keys and values
        outs = []
        for i, block in enumerate(self.layout.blocks):
            r, w = block.queries.shape
            qb = qs[i].view(heads, r, w, -1)
            if isinstance(block, AttentionBlock):
                kb, vb = ks[i].view(heads, r, w, -1), vs[i].view(heads, r, w, -1)
                gathered[i] = (kb, vb)
                o = self._causal(i, qb, kb, vb, dropout, scale)
            else:  # the same slots as [R·G, Wc] rows, one completion each
                own = (heads, r * block.group, w // block.group, -1)
                o = self._prefixed(i, block, qb, ks[i].view(own), vs[i].view(own),
                                   *gathered[block.prefix], dropout, scale)
            outs.append(o.reshape(-1, dv))
        outs.append(vh.new_zeros(1, dv))  # what fillers read
        return torch.cat(outs).index_select(0, back).view(1, heads, length, dv)


__all__ = ["AttentionBlock", "BUCKET_SLACK", "GroupAttention", "PaddedLayout", "PrefixedBlock", "WIDTH_MULTIPLE",
           "causal_blocks", "causal_rows", "length_buckets", "round_up"]
