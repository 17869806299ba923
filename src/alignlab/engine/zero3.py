"""DeepSpeed ZeRO stage 3: the weights partitioned over the ranks too (``train.sharding: zero3``
or ``accelerate launch`` with ``configs/accelerate/zero3.yaml``).

Stage 3 (Rajbhandari et al. 2020) keeps ``1/N`` of every weight on each rank besides its share
of the gradients and AdamW state, as FSDP2 does. DeepSpeed hooks every sub-module of the
engine's module: a module's weights are all-gathered before its forward and released after it
(again for its backward). ``engine/zero.py`` runs the engine under alignlab's loop as for stages
1 and 2; what stage 3 changes is here:

- a weight read outside its module's forward (the fast paths' decoder-and-head calls, the
  chunked output projection) is an empty partition: the fast paths are off under stage 3
  (``sharding.check``) and ``find_backbone_and_head`` returns None for a partitioned model, so
  log-probs go through ``model(...)``;
- work ranks do unevenly (sampling, no-grad scoring, rank 0's evaluation) must call no
  collective, so it runs inside :func:`full_weights`: every weight gathered once
  (``deepspeed.zero.GatheredParameters``) and the module hooks removed until it ends (else the
  first module's forward would release what was gathered), as TRL's
  ``unwrap_model_for_generation`` does;
- checkpoints and ``final/`` hold full state dicts gathered the same way
  (:func:`state_dict`), loaded back and re-partitioned (:func:`load_state_dict`). Both gather
  every weight at once, so the whole model must fit one rank's memory for that moment (true
  of every model here; DeepSpeed's own consolidation gathers module by module).

DeepSpeed's hook lists (``parameter_offload.forward_hooks``/``backward_hooks``) and
``_register_deepspeed_module`` are not a public API; TRL relies on the same ones. Every
function here is only called for a model :func:`partitioned` says is partitioned.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from alignlab.engine import distributed

# model -> DeepSpeed's parameter offload (its hooks and the engine's module) of the engine that
# partitioned it
_OFFLOADS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def register(model: nn.Module, engine_optimizer: Any) -> None:
    """Remember the engine that partitioned ``model`` (called by ``zero.ZeroOptimizer``)."""
    _OFFLOADS[model] = engine_optimizer.parameter_offload


def partitioned(model: nn.Module) -> bool:
    """Whether a ZeRO-3 engine partitioned ``model``'s weights (or a module holding it)."""
    # every weight of a partitioned module carries ds_id: the first one tells (called per step)
    return model in _OFFLOADS or hasattr(next(model.parameters(), None), "ds_id")


def _offload(model: nn.Module) -> Any:
    offload = _OFFLOADS.get(model)
    if offload is None:
        offload = next((o for m, o in _OFFLOADS.items()
                        if any(sub is model for sub in m.modules())), None)
    if offload is None:
        raise RuntimeError(f"{type(model).__name__}: partitioned by no ZeRO-3 engine known here")
    return offload


def _gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Any:
    """DeepSpeed's gathering context; nothing when every weight is gathered already (inside
    :func:`full_weights`: DeepSpeed refuses nested gathering of the same weights)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if all(p.ds_status == ZeroParamStatus.AVAILABLE for p in params):
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Inside, ``model`` holds every weight on every rank and its forwards call no collective
    (the engine's module hooks removed; restored on exit). Entering and leaving are collective.
    No backward inside."""
    offload = _offload(model)
    params = list(offload.module.parameters())
    with _gathered(params):
        for p in params:
            p.ds_active_sub_modules.clear()
        for hook in (*offload.forward_hooks, *offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def state_dict(model: nn.Module, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The full state dict of ``model`` on the CPU: on rank 0 (``{}`` on the others), or on
    every rank (``everywhere``). Collective."""
    with _gathered(list(model.parameters())):
        if not (everywhere or distributed.is_main()):
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def load_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load a full state dict (the same on every rank): gathered, loaded, and each rank's
    partition refreshed from it (rank 0's broadcast on leaving, ``modifier_rank``). Collective;
    outside :func:`full_weights`. The unexpected keys."""
    own = set(model.state_dict())
    with _gathered(list(model.parameters()), modifier_rank=0):
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return sorted(set(state) - own)


def held_fraction(model: nn.Module) -> float:
    """The share of ``model``'s weights this rank's partition holds."""
    held = sum(p.ds_tensor.numel() for p in model.parameters())
    return held / sum(p.ds_numel for p in model.parameters())


__all__ = ["full_weights", "held_fraction", "load_state_dict", "partitioned", "register",
           "state_dict"]
