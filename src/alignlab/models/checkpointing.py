"""Activation (gradient) checkpointing that stays exact under alignlab's own forward contexts.

``train.gradient_checkpointing: true`` has each decoder layer keep only its input and run again
in backward (transformers' ``activation_checkpointing_enable``, non-reentrant): less activation
memory for about a third more compute, so it is off unless memory needs it. ``selective`` keeps
the outputs of the matmuls (projections and attention scores) and recomputes only the cheap
element-wise ops between them (norms, rotary embedding, SiLU, products, softmax): torch's
selective activation checkpointing (``create_selective_checkpoint_contexts``) with the policy of
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", turned
around: they recompute attention's element-wise core and keep the matmuls, as here.

Some of alignlab's forward passes run the decoder inside contexts: the one-pass prefix sharing
intercepts attention (``GroupAttention``), CPU attention is routed to matmuls (``CpuAttention``)
and the last layer runs on a row subset (``last_layer_only_at``). A layer recomputed in backward
runs after those contexts have closed; without them it would compute something else (full
attention over the packed batch, say). So passes register their contexts with
:func:`recompute_with`, and the checkpoint's ``context_fn`` re-enters the ones active when a layer
ran forward around that layer's recomputation.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from alignlab.core.errors import ConfigError

Factory = Callable[[], ContextManager[Any]]
_ACTIVE: ContextVar[tuple[Factory, ...]] = ContextVar("alignlab_recompute_contexts", default=())


@contextlib.contextmanager
def recompute_with(*factories: Factory) -> Iterator[None]:
    """Inside, a checkpointed layer that runs forward is recomputed under ``f()`` for every
    factory (besides the ones registered outside)."""
    token = _ACTIVE.set(_ACTIVE.get() + factories)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def _entered(factories: tuple[Factory, ...]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for make in factories:
            stack.enter_context(make())
        yield


def recompute_context() -> tuple[ContextManager[Any], ContextManager[Any]]:
    """``context_fn`` for ``torch.utils.checkpoint``: the forward runs as is; the recomputation
    re-enters the contexts registered when the forward ran."""
    return contextlib.nullcontext(), _entered(_ACTIVE.get())


# The ops whose outputs a selective checkpoint keeps: every matmul (the projections, the attention
# scores and their product with the values; nn.Linear reaches the dispatcher as mm/addmm) and the
# fused attention kernels. Everything else (norms, rotary, activations, softmax, views) reruns.
_aten = torch.ops.aten
KEPT_OPS = frozenset({
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
})


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_recompute_context() -> tuple[ContextManager[Any], ContextManager[Any]]:
    """``context_fn`` of ``selective`` checkpointing: torch's selective-checkpoint contexts
    keeping :data:`KEPT_OPS`' outputs, and the recomputation re-entering the registered contexts
    as :func:`recompute_context` does."""
    forward, recompute = create_selective_checkpoint_contexts(_keep_matmuls)
    # the registered contexts first: what they build on entry is not part of the layer's ops
    return forward, _stacked(_entered(_ACTIVE.get()), recompute)


@contextlib.contextmanager
def _stacked(*contexts: ContextManager[Any]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether any layer of ``model`` checkpoints."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def enable_gradient_checkpointing(model: nn.Module, mode: bool | str = True) -> None:
    """Checkpoint every decoder layer of the transformers model in ``model`` (itself or, for
    wrappers such as a scalar-head model, the first one inside); ``mode`` ``"selective"`` keeps
    the matmul outputs (:func:`selective_recompute_context`)."""
    if mode not in (True, "selective"):
        raise ConfigError(f"field 'train.gradient_checkpointing': {mode!r} is not one of "
                          "false, true, selective")
    from transformers import PreTrainedModel

    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is None or not getattr(inner, "supports_gradient_checkpointing", False):
        name = type(inner or model).__name__
        raise ConfigError(f"field 'train.gradient_checkpointing': {name} does not support "
                          "activation checkpointing; set it to false")
    # Non-reentrant: gradients reach the layers' inputs even when the embeddings are frozen
    # (LoRA), and context_fn is supported.
    inner.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": (
            selective_recompute_context if mode == "selective" else recompute_context)})


__all__ = ["KEPT_OPS", "checkpointing_enabled", "enable_gradient_checkpointing", "recompute_context",
           "recompute_with", "selective_recompute_context"]
