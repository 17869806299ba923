"""Activation (gradient) checkpointing that stays exact under alignlab's own forward contexts.

``train.gradient_checkpointing: true`` has each decoder layer keep only its input and run again
in backward (transformers' ``activation_checkpointing_enable``, non-reentrant): less activation
memory for about a third more compute, so it is off unless memory needs it.

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

from torch import nn

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


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether any layer of ``model`` checkpoints."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer of the transformers model in ``model`` (itself or, for
    wrappers such as a scalar-head model, the first one inside)."""
    from transformers import PreTrainedModel

    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is None or not getattr(inner, "supports_gradient_checkpointing", False):
        name = type(inner or model).__name__
        raise ConfigError(f"field 'train.gradient_checkpointing': {name} does not support "
                          "activation checkpointing; set it to false")
    # Non-reentrant: gradients reach the layers' inputs even when the embeddings are frozen
    # (LoRA), and context_fn is supported.
    inner.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": recompute_context})


__all__ = ["checkpointing_enabled", "enable_gradient_checkpointing", "recompute_context",
           "recompute_with"]
