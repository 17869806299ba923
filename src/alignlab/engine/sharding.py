"""Sharded data parallel with torch's FSDP2 (``train.sharding: fsdp``).

FSDP (Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel"),
the ZeRO-3 layout (Rajbhandari et al. 2020): each of N processes keeps ``1/N`` of every weight,
gradient and AdamW moment. ``shard`` calls ``torch.distributed.fsdp.fully_shard`` on each
decoder layer (the classes the model names in ``_no_split_modules``, as accelerate's transformer
wrap policy does) and then on the root, which holds the rest (embeddings, the tied output
embedding, the final norm, a value head). A layer's weights are all-gathered in its own forward
and its gradients reduce-scattered in its backward, so:

- the log-prob interface must call the root module, not its parts: ``shard`` turns the fast
  paths off with one logged line (``models/fast_path.py``) and ``find_backbone_and_head``
  returns None for an ``FSDPModule``, so every log-prob goes through ``model(...)`` (the full
  logits of a micro-batch in memory);
- every rank must run the same forwards and backwards: the offline loop's ranks do; the online
  learner pads a rank with fewer micro-batches with zero-weighted ones (``loop.forward_backward``);
- the reduce-scatter **sums** (``set_gradient_divide_factor(1)``), as the loop's
  normalisation by the global item count expects (``engine/loop.py``); ``reduce_gradients``
  leaves those gradients alone;
- work one rank does alone or ranks do unevenly (sampling rollouts, no-grad scoring, rank 0's
  held-out evaluation) runs inside ``full_weights``: every layer gathered once, no collective
  until it ends (online, the policy's and every ``OnlineAlgorithm.scoring_models``: PPO's
  critic, a second sharded model with its own learner);
- checkpoints and ``final/`` hold the full state dict (gathered on every rank, written by
  rank 0), so they are the files of an unsharded run; every rank loads them back (a reward
  model's ``final/`` too: ``CausalLMWithScalarHead.save_pretrained(state_dict=...)``).

Every function is a no-op (or the plain single-model operation) for a model ``shard`` did not
shard.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from alignlab.core.config import TrainSection
from alignlab.core.errors import ConfigError
from alignlab.engine import distributed, zero, zero3
from alignlab.models.adapters import has_adapters
from alignlab.models.fast_path import set_fast_paths

log = logging.getLogger(__name__)

FAST_PATHS_OFF = ("train.sharding=fsdp: FSDP2 gathers each layer's weights in that module's own "
                  "forward, which the fast paths and the chunked output projection bypass by "
                  "calling sub-modules; log-probs go through model(...) with the full logits")
ZERO3_FAST_PATHS_OFF = ("train.sharding=zero3: DeepSpeed gathers a module's weights in its own "
                        "forward, which the fast paths and the chunked output projection bypass "
                        "by reading weights directly; log-probs go through model(...)")
_RESHARD = "_alignlab_reshard_after_forward"  # per FSDP module: its setting outside full_weights


def accelerate_fsdp() -> bool:
    """``accelerate launch`` with an FSDP config of ``fsdp_version: 2`` (what it sets in the
    environment of each process). Version 1 is refused by ``distributed.setup``."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1")
            and os.environ.get("FSDP_VERSION", "1") == "2")


def mode(cfg: TrainSection) -> str:
    """``fsdp`` when ``train.sharding`` or an accelerate FSDP2 launch asks for it, else ``none``."""
    return "fsdp" if cfg.sharding == "fsdp" or accelerate_fsdp() else "none"


def sharded_by(cfg: TrainSection) -> str | None:
    """``fsdp``, ``zero1`` or ``zero2`` when the run asks for sharding (``train.sharding`` or
    an accelerate launch), else None."""
    if mode(cfg) == "fsdp":
        return "fsdp"
    stage = zero.stage(cfg)
    return f"zero{stage}" if stage else None


def check(cfg: Any) -> None:
    """A ConfigError naming ``train.sharding`` for what alignlab does not shard yet (before
    anything is loaded), under FSDP2 and DeepSpeed ZeRO (``engine/zero.py``, whose own settings
    ``zero.check`` refuses first): LoRA, asynchronous or vLLM rollouts, a trainer that has not
    opted in (every built-in one has). A trainer's config class opts in with
    ``SHARDABLE = True``. Under FSDP2 the fast paths are then turned off, before a
    trainer picks a batch layout by them (ZeRO-1/2 keep the whole weights on every rank)."""
    zero.check(cfg.train, distributed.world_size())
    kind = sharded_by(cfg.train)
    if kind is None:
        return
    name = type(cfg).__name__
    if not getattr(type(cfg), "SHARDABLE", False):
        raise ConfigError(f"field 'train.sharding': '{kind}' is not supported by this trainer "
                          f"({name}) yet: every built-in trainer runs sharded, this config class "
                          "has not opted in (SHARDABLE = True; docs/scaling.md); set it to "
                          "'none' (data parallel)")
    model = getattr(cfg, "model", None)
    if model is not None and model.lora is not None:
        raise ConfigError(f"field 'train.sharding': '{kind}' with model.lora is not supported "
                          "yet (LoRA already keeps the optimizer state small); set it to 'none'")
    rl, rollout = getattr(cfg, "rl", None), getattr(cfg, "rollout", None)
    if rl is not None and getattr(rl, "max_staleness", 0):
        raise ConfigError(f"field 'train.sharding': '{kind}' is run with synchronous rollouts "
                          "only (a rollout thread sampling ahead of a sharded update is not "
                          "written yet); set rl.max_staleness to 0 or train.sharding to 'none'")
    if rollout is not None and getattr(rollout, "backend", "builtin") != "builtin":
        raise ConfigError(f"field 'train.sharding': '{kind}' is run with rollout.backend builtin "
                          "only (the vLLM weight sync of a sharded policy is not written yet)")
    if kind == "fsdp":
        set_fast_paths(False, FAST_PATHS_OFF)
    elif kind == "zero3":
        set_fast_paths(False, ZERO3_FAST_PATHS_OFF)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of the classes the model names in ``_no_split_modules`` (its decoder layers)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s weights are split over the ranks: by FSDP2, or by DeepSpeed ZeRO-3
    (``engine/zero3.py``; every function here then runs its stage-3 form)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or zero3.partitioned(model)


def _fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module, cfg: TrainSection) -> bool:
    """``fully_shard`` each decoder layer, then the root, when ``cfg`` asks for FSDP and
    several processes run; True when ``model`` is (now) sharded. The replicas first take rank
    0's weights, as in data parallel. Call before collecting the parameters for the optimizer:
    FSDP replaces them with sharded ``DTensor`` parameters."""
    if is_sharded(model):
        return True
    if mode(cfg) != "fsdp" or not distributed.active():
        return False
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if has_adapters(model):
        raise ConfigError("field 'train.sharding': 'fsdp' with model.lora is not supported yet")
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"field 'train.sharding': {type(model).__name__} names no decoder "
                          "layer class in _no_split_modules, so FSDP2 would hold the whole "
                          "model in one unit; set it to 'none'")
    distributed.broadcast_module(model)
    after_forward = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for layer in layers:
        fully_shard(layer, reshard_after_forward=after_forward)
        setattr(layer, _RESHARD, after_forward)
    # The root's weights are used again at once by backward: FSDP keeps them gathered anyway.
    fully_shard(model, reshard_after_forward=False)
    setattr(model, _RESHARD, False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum: the loop normalises by the global count
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    set_fast_paths(False, FAST_PATHS_OFF)
    if distributed.is_main():
        print(f"train.sharding fsdp: {len(layers)} decoder layers and the root sharded over "
              f"{distributed.world_size()} processes (FSDP2)")
    return True


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Inside, ``model`` holds every weight on every rank and its forwards call no collective:
    ranks may run different numbers of them (rollouts, scoring) or one rank alone (rank 0's
    evaluation). Entering and leaving are collective (every rank must). No backward inside."""
    if zero3.partitioned(model):
        with zero3.full_weights(model):
            yield
        return
    modules = _fsdp_modules(model) if is_sharded(model) else []
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(getattr(m, _RESHARD, True), recurse=False)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of a sharded ``model`` on rank 0's CPU (``{}`` on the others; every
    rank must call it); None when ``model`` is not sharded."""
    if not is_sharded(model):
        return None
    if zero3.partitioned(model):
        return zero3.state_dict(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``; for a sharded ``model`` its full tensors on every rank (every
    rank must call it): what a rank copies into a model of its own (a refreshed reference)."""
    if not is_sharded(model):
        return model.state_dict()
    if zero3.partitioned(model):
        return zero3.state_dict(model, everywhere=True)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load a full state dict into a sharded ``model`` on every rank; the unexpected keys."""
    if zero3.partitioned(model):
        return zero3.load_state_dict(model, state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    own = set(model.state_dict())
    set_model_state_dict(model, {k: v for k, v in state.items() if k in own},
                         options=StateDictOptions(full_state_dict=True, strict=False))
    return sorted(set(state) - own)


def optimizer_state_dict(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()``; for a sharded ``model`` the full one (parameter names as keys) on
    rank 0 (every rank must call it), which ``load_optimizer_state_dict`` reshards (DeepSpeed's
    optimizer: every rank's partition, ``zero.ZeroOptimizer.state_dict``)."""
    if not _fsdp(model) or isinstance(opt, zero.ZeroOptimizer):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(_holder(model, opt), opt, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def _holder(model: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
    """``model``, or a module holding it and the optimizer's parameters outside it (a shared
    critic's value head): torch's optimizer state dicts name every parameter by its path in the
    module they are given."""
    own = {id(p) for p in model.parameters()}
    extra = [p for g in opt.param_groups for p in g["params"] if id(p) not in own]
    if not extra:
        return model
    holder = nn.Module()
    holder.model, holder.extra = model, nn.ParameterList(extra)
    return holder


def load_optimizer_state_dict(model: nn.Module, opt: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    if not _fsdp(model) or isinstance(opt, zero.ZeroOptimizer):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(_holder(model, opt), opt, state,
                             options=StateDictOptions(full_state_dict=True))


def holds_shards(params: Sequence[torch.Tensor]) -> bool:
    """Whether ``params`` are FSDP2's sharded parameters (``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


def grad_norm(params: Sequence[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The global gradient norm (clipped to ``max_norm`` when given) of sharded parameters, and
    of whole ones beside them (a shared critic's value head, its gradient already summed over
    the ranks): the norm over every rank's shards, the same on every rank."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    shards = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    norms = []
    if shards:
        n = torch.nn.utils.get_total_norm(shards)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    if whole:
        norms.append(torch.nn.utils.get_total_norm(whole))
    norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)
    if max_norm:  # clip_grad_norm_'s rule (in float32), which cannot mix DTensor and tensor norms
        coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        for g in grads:
            g.mul_(coef)
    return norm


__all__ = ["FAST_PATHS_OFF", "accelerate_fsdp", "check", "decoder_layers", "full_state_dict",
           "full_weights", "gathered_state_dict", "grad_norm", "holds_shards", "is_sharded", "load_full_state_dict",
           "load_optimizer_state_dict", "mode", "optimizer_state_dict", "shard", "sharded_by"]
