"""Run a decoder's last layer only where its output is read.

In a prefix-sharing pass the last layer's output matters only at the positions that predict a
scored token (each prompt's last token, the completions' tokens). Every other position needs
only its keys and values, which come from that layer's *input*; so its query projection,
attention output projection and MLP can run on the needed rows alone.
"""

from __future__ import annotations

import contextlib

from torch import Tensor, nn


class RowSubset(nn.Module):
    """``inner`` applied to the rows ``index`` of the flattened ``[B, T, H]`` input only; the
    other rows of the output are zero. ``index`` is set by :func:`last_layer_only_at`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.index: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = self.inner(flat.index_select(0, self.index))
        return y.new_zeros(flat.shape[0], y.shape[-1]).index_copy(0, self.index, y).view(
            *x.shape[:-1], y.shape[-1])


@contextlib.contextmanager
def last_layer_only_at(decoder: nn.Module, index: Tensor):
    """Inside, run the last decoder layer's query projection, attention output projection and
    MLP only at the flattened positions ``index`` (those whose final hidden state is read).

    Every other position needs only its keys and values; the last layer's K/V come from that
    layer's *input*, so the skipped outputs feed nothing. On the long shared prompts of chat
    preference data this removes most of one layer's work per prompt token.
    Applies to decoders whose layers expose ``mlp`` and ``self_attn.o_proj`` (Llama, Mistral,
    Qwen, Gemma, Phi-3, ...); others run unchanged."""
    layers = getattr(decoder, "layers", None)
    layer = layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None
    attn = getattr(layer, "self_attn", None)
    if not (isinstance(getattr(layer, "mlp", None), nn.Module)
            and isinstance(getattr(attn, "o_proj", None), nn.Module)):
        yield
        return
    swaps = [(layer, "mlp"), (attn, "o_proj")]
    if isinstance(getattr(attn, "q_proj", None), nn.Module):
        # Queries are needed only where the output is: the zero queries of the other rows give
        # a uniform (finite) attention whose output o_proj never reads.
        swaps.append((attn, "q_proj"))
    for owner, name in swaps:
        owner._modules[name] = RowSubset(owner._modules[name])
        owner._modules[name].index = index
    # Plain attribute swaps (no hooks): the original modules come back even if the forward raises.
    try:
        yield
    finally:
        for owner, name in swaps:
            owner._modules[name] = owner._modules[name].inner


__all__ = ["RowSubset", "last_layer_only_at"]
