"""Attention for the short sequences of preference data on CPU, as plain batched matmuls.

On CPU, PyTorch's fused SDPA kernel is slower than two batched matmuls at these sizes (a few
hundred tokens; figures in ``benchmarks/README.md``), and the score matrix of a few hundred
tokens is small. :class:`CpuAttention` routes ``scaled_dot_product_attention`` calls made
inside it to :func:`matmul_attention`; dropout, GPUs and long sequences keep SDPA. Private:
entered only by :mod:`alignlab.models.logprobs`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from alignlab.core.runtime import autocast_dtype
from alignlab.models.checkpointing import recompute_with

# Above this many bytes of attention scores (batch x heads x queries x keys, in the dtype the
# matmuls run in) the explicit attention would hold too large a score matrix (autograd keeps it
# for backward); SDPA's flash kernel keeps its own blocks small. 32 MiB: 8.4M float32 scores,
# 16.8M bfloat16 ones. (A count of scores, 8.4M for both, sent the DPO benchmark's widest bf16
# prompt blocks to the flash kernel, 3x slower than the matmuls at that size; benchmarks/README.md.)
MAX_SCORE_BYTES = 1 << 25
# Forward-only calls run in slices of at most this many scores, which stay in cache (faster than
# one piece; benchmarks/README.md). With autograd the pieces' extra ops cost more than the cache
# saves, so training calls run whole.
NO_GRAD_SLICE_SCORES = 1 << 21


def fits(q: Tensor, keys: int) -> bool:
    """Whether the scores of ``q [..., tq, d]`` against ``keys`` keys stay within
    :data:`MAX_SCORE_BYTES` in the dtype the matmuls run in (autocast's, where it is on)."""
    dtype = autocast_dtype(q.device) if q.dtype == torch.float32 else None
    return q.shape[:-1].numel() * keys * (dtype or q.dtype).itemsize <= MAX_SCORE_BYTES


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                     dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False) -> Tensor:
    """``softmax(q k^T · scale + bias) v`` as two batched matmuls in the inputs' precision;
    ``is_causal`` is top-left aligned like SDPA's. ``dropout_p`` must be 0.

    The mask becomes an additive bias fused into the score matmul (``baddbmm``): masked scores
    get the dtype's most negative *finite* value, so a fully masked row (a pad query) gives a
    uniform distribution rather than NaN. The scores stay in the inputs' dtype: the matmul has
    already rounded them to it, and CPU softmax accumulates reduced-precision inputs in float32,
    so an explicit float32 upcast would change nothing but cost two copies of the score matrix
    (about twice the time; benchmarks/README.md)."""
    if dropout_p:
        raise ValueError("matmul_attention has no dropout")
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    *lead, tq, d = q.shape
    tk = k.shape[-2]
    if is_causal:
        bias = causal_bias(tq, tk, q.dtype, q.device)
    elif attn_mask is None:
        bias = q.new_zeros(())
    elif attn_mask.dtype == torch.bool:
        bias = mask_bias(attn_mask, q.dtype)
    else:  # additive; float32's minimum would round to -inf in bfloat16
        bias = attn_mask.to(q.dtype).clamp_min(torch.finfo(q.dtype).min)
    if bias.dim() > 2:  # baddbmm broadcasts a [tq|1, tk] bias; per-row masks are expanded
        bias = (bias.expand(*lead, tq, tk).reshape(-1, tq, tk) if bias.shape[:-2].numel() > 1
                else bias.reshape(bias.shape[-2:]))
    return attention_with_bias(q, k, v, bias, scale)


def causal_bias(tq: int, tk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[tq, tk]`` additive bias of a top-left aligned causal mask."""
    keep = torch.ones(tq, tk, dtype=torch.bool, device=device).tril()
    return mask_bias(keep, dtype)


def mask_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean keep-mask as an additive bias: 0 where kept, the dtype's most negative finite
    value elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


def attention_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor,
                        scale: float | None = None) -> Tensor:
    """``softmax(q k^T · scale + bias) v`` for ``q [..., tq, d]``, ``k, v [..., tk, ·]`` with
    the same leading dims, and an additive ``bias`` in their dtype: ``[tq|1, tk]`` (shared) or
    ``[rows, tq, tk]`` (one per flattened leading index)."""
    *lead, tq, d = q.shape
    tk = k.shape[-2]
    q3, k3, v3 = q.reshape(-1, tq, d), k.reshape(-1, tk, d), v.reshape(-1, tk, v.shape[-1])
    alpha = scale if scale is not None else d ** -0.5
    rows = q3.shape[0]
    step = rows if torch.is_grad_enabled() else max(1, NO_GRAD_SLICE_SCORES // (tq * tk))
    outs = []
    for s in range(0, rows, step):
        b = bias if bias.dim() < 3 else bias[s:s + step]
        scores = torch.baddbmm(b, q3[s:s + step], k3[s:s + step].transpose(1, 2), alpha=alpha)
        outs.append(torch.bmm(torch.softmax(scores, dim=-1), v3[s:s + step]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(*lead, tq, v.shape[-1])


class CpuAttention(TorchFunctionMode):
    """Route CPU ``scaled_dot_product_attention`` calls without dropout and with at most
    :data:`MAX_SCORE_BYTES` of scores (:func:`fits`) to :func:`matmul_attention`; every other call runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) <= 3:
            q, k = args[0], args[1] if len(args) > 1 else kwargs.get("key")
            if (isinstance(q, Tensor) and isinstance(k, Tensor) and q.device.type == "cpu"
                    and not kwargs.get("dropout_p") and fits(q, k.shape[-2])):
                return matmul_attention(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_attention(device: torch.device) -> Iterator[None]:
    """:class:`CpuAttention` on CPU (also around checkpointed layers' recomputation), nothing
    elsewhere."""
    if device.type != "cpu":
        yield
        return
    with recompute_with(CpuAttention), CpuAttention():
        yield


__all__ = ["CpuAttention", "cpu_attention", "fits", "MAX_SCORE_BYTES", "attention_with_bias", "causal_bias", "mask_bias",
           "matmul_attention"]
