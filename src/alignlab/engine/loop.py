"""The one training loop under every trainer.

An algorithm supplies two things: ``num_items(batch)`` (how many units its loss sums over:
tokens, pairs, sequences) and ``loss(model, batch) -> LossOutput`` whose ``loss_sum`` is a
*sum* over those units. The loop divides every micro-batch's sum by the total ``num_items``
of the whole accumulation window, so ``grad_accum`` micro-batches of ``b`` give exactly the
loss and gradient of one batch of ``grad_accum * b``.

With N processes (``engine/distributed.py``) each rank takes ``batch_size / N`` of every
micro-batch, the item count is summed over the ranks before dividing and the gradients are
summed after the backward passes: the update of one process with the window split N ways. An
objective with state of its own (BCO's reward shift) may define ``sync_across_ranks()``, called
on every rank after each window's micro-batches; ``loss`` itself must not call collectives (in
the online learner the ranks run different numbers of micro-batches).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from alignlab.core.config import TrainSection
from alignlab.core.errors import ConfigError, NonFiniteError
from alignlab.core.runtime import (
    autocast,
    pick_device,
    resolve_precision,
    seed_everything,
    to_device,
)
from alignlab.engine import distributed, sharding, zero
from alignlab.engine.run import TrainingRun
from alignlab.models.checkpointing import enable_gradient_checkpointing


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Algorithm(Protocol):
    def num_items(self, batch: dict[str, Any]) -> float: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput: ...


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, Any]]
    output_dir: Path
    seconds: float


def build_optimizer(model: torch.nn.Module, cfg: TrainSection) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    # The fused kernel (CPU and CUDA) updates all tensors in one pass instead of a Python loop
    # over them (figures: benchmarks/README.md).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) and \
        len({p.device for p in params}) == 1
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, fused=fused or None)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    warm, total = cfg.warmup_steps, cfg.max_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(model: torch.nn.Module, algorithm: Algorithm, batches: Iterable[dict[str, Any]],
          cfg: TrainSection, *, description: str = "train",
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run ``cfg.max_steps`` optimizer steps of ``algorithm`` on ``batches``.

    ``batches`` yields micro-batches; if it has ``state_dict``/``load_state_dict`` its position
    is checkpointed so a resumed run continues with the exact next micro-batch.
    """
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    model.to(device)
    model.train()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.gradient_checkpointing)
    if distributed.active():
        if not hasattr(batches, "shard"):
            raise ConfigError("train: with several processes the micro-batches must come from "
                              "a stream that can be sharded (data.batches.EpochBatches)")
        batches.shard(distributed.share(cfg.batch_size, "examples per micro-batch",
                                        "train.batch_size"))
        if not sharding.shard(model, cfg):  # FSDP2 (train.sharding), else replicas
            distributed.broadcast_module(model)
    params = [p for p in model.parameters() if p.requires_grad]  # sharded ones under FSDP
    opt = zero.wrap(model, build_optimizer(model, cfg), cfg)  # DeepSpeed ZeRO-1/2 (train.sharding)
    sched = build_scheduler(zero.torch_optimizer(opt), cfg)

    run = TrainingRun(cfg, model, description)
    start_step, state = run.resume()
    if state is not None:
        sharding.load_optimizer_state_dict(model, opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if hasattr(batches, "load_state_dict") and state.get("data") is not None:
            batches.load_state_dict(state["data"])

    def trainer_state() -> dict[str, Any]:
        return {"optimizer": sharding.optimizer_state_dict(model, opt),
                "scheduler": sched.state_dict(),
                "data": batches.state_dict() if hasattr(batches, "state_dict") else None}

    stream: Iterator[dict[str, Any]] = iter(batches)
    t0 = time.time()
    step = start_step
    with run.open(start_step):
        while step < cfg.max_steps:
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            t_step = time.time()
            loss_total, denom, sums = forward_backward(model, algorithm, micro, device, precision,
                                                       step=step + 1, context=_last(run.history),
                                                       optimizer=opt)
            grad_norm = optimizer_step(params, opt, cfg.max_grad_norm, step=step + 1)
            sched.step()
            step += 1
            metrics = {"loss": loss_total, "grad_norm": grad_norm.item(),
                       "lr": sched.get_last_lr()[0], "step_time": time.time() - t_step,
                       "num_items": denom, **sums}
            if on_step is not None:
                on_step(step, metrics)
            run.step_done(step, metrics, f"loss {loss_total:.4f}", trainer_state)
    return TrainResult(step=step, history=run.history, output_dir=run.output_dir,
                       seconds=time.time() - t0)


def forward_backward(model: torch.nn.Module, algorithm: Algorithm, micro: list[dict[str, Any]],
                     device: torch.device, precision: str = "fp32", *, step: int = 0,
                     context: dict[str, Any] | None = None, allow_empty: bool = False,
                     padding: list[dict[str, Any]] = (), optimizer: Any = None
                     ) -> tuple[float, float, dict[str, float]] | None:
    """Accumulate the gradient of one optimizer step over ``micro``-batches.

    Each micro-batch's ``loss_sum`` is divided by the ``num_items`` of the whole window, so the
    result equals one forward/backward over the concatenated batch. Returns (loss, num_items,
    metrics): each metric is averaged over the micro-batches weighted by their ``num_items``, so
    a mean over the loss's items (tokens, pairs) is the window's mean however it is split.
    With N processes the window is every rank's micro-batches: ``num_items``, the loss and the
    metrics are summed over the ranks (the gradients are summed by ``optimizer_step``).
    ``allow_empty``: a window with no items returns None instead of raising. ``padding``:
    micro-batches run after ``micro`` with their loss multiplied by 0, so that a rank of a
    sharded model runs as many forwards and backwards as the others (FSDP2's collectives);
    they add nothing to the gradient, the loss or the metrics. ``optimizer``: the step's
    optimizer; DeepSpeed's (``zero.ZeroOptimizer``) runs the backward passes.
    """
    items = [float(algorithm.num_items(b)) for b in micro]
    many = distributed.active()
    denom = distributed.global_sum([sum(items)])[0] if many else sum(items)
    if denom <= 0:
        if allow_empty:
            return None
        raise NonFiniteError(f"step {step}: the batch has nothing to train on "
                             "(num_items is 0; are all loss masks empty?)")
    sums: dict[str, float] = defaultdict(float)
    loss_total = 0.0
    failure = None
    # FSDP2 and ZeRO-2 reduce-scatter in every backward: each rank runs all of its passes, even
    # after a failure (the others learn of it below, so every rank stops together)
    sharded = sharding.is_sharded(model) or zero.even_backwards(optimizer)
    backward = zero.backward_of(optimizer)
    for i, b in enumerate([*micro, *padding]):
        if failure is not None and not sharded:
            break
        b = to_device(b, device)
        with autocast(device, precision):
            loss_sum, metrics = zero.loss_of(optimizer, algorithm, model, b)
        if i >= len(micro) or failure is not None:  # the collectives run, the gradient gains 0
            backward(loss_sum.float() * 0.0)
            continue
        loss = loss_sum.float() / denom
        if not torch.isfinite(loss):
            failure = (f"step {step}, micro-batch {i + 1}"
                       f"{f' of rank {distributed.rank()}' if many else ''}: the loss is "
                       f"{loss.item()}; training stopped. Last logged metrics: {context or {}}. "
                       "Try a lower train.lr, train.precision=fp32, or check the data and rewards.")
            if not many:
                raise NonFiniteError(failure)
            if sharded:
                backward(loss_sum.float() * 0.0)
            continue
        backward(loss)
        loss_total += loss.item()
        for k, v in metrics.items():
            sums[k] += float(v) * items[i] / denom
    if many:
        sync = getattr(algorithm, "sync_across_ranks", None)
        if sync is not None:  # an objective's state (BCO's δ): the same on every rank again
            sync()
        loss_total, sums, failure = _sum_over_ranks(loss_total, sums, failure)
    return loss_total, denom, dict(sums)


def _sum_over_ranks(loss: float, sums: dict[str, float], failure: str | None
                    ) -> tuple[float, dict[str, float], None]:
    """Every rank's loss and weighted metric sums added up (a metric some rank did not log
    counts 0 there, as a micro-batch without it does in one process); raises on every rank
    when any rank's loss was not finite."""
    parts = distributed.gather((loss, dict(sums), failure))
    failures = [f for _, _, f in parts if f is not None]
    if failures:
        raise NonFiniteError(failures[0])
    total: dict[str, float] = defaultdict(float)
    for _, part, _ in parts:
        for k, v in part.items():
            total[k] += v
    return sum(p[0] for p in parts), total, None


def optimizer_step(params: list[torch.Tensor], opt: torch.optim.Optimizer | zero.ZeroOptimizer,
                   max_grad_norm: float | None, *, step: int = 0) -> torch.Tensor:
    """Sum the gradient over the ranks (with N processes), clip it, refuse a non-finite one,
    step and zero it; the grad norm (the same on every rank). DeepSpeed's engine does all of
    it for a ``zero.ZeroOptimizer`` (clipping to the ``max_grad_norm`` of its config)."""
    if isinstance(opt, zero.ZeroOptimizer):
        return opt.step(step)
    distributed.reduce_gradients(params)
    if sharding.holds_shards(params):
        grad_norm = sharding.grad_norm(params, max_grad_norm)
    else:
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                     if max_grad_norm else _grad_norm(params))
    if not torch.isfinite(grad_norm):
        raise NonFiniteError(f"step {step}: the gradient norm is {grad_norm.item()}; "
                             "training stopped before the weights were corrupted.")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)


def _last(history: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in history[-1].items() if k != "time"} if history else {}
