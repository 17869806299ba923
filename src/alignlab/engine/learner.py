"""The learner of online training: a model, its optimizer and LR schedule, and ``update``.

``update(units)`` runs ``epochs`` passes over shuffled minibatches of prepared *units* — rows of
a rollout batch, preference pairs, groups of completions: whatever the algorithm's objective
takes — with one optimizer step per minibatch; a minibatch's micro-batches take its units in
index order, so the completions of one prompt stay together. A unit is only an index here: ``units.take``
builds the micro-batch of any list of indices, so the learner never knows the batch's shape.
Micro-batches go through the offline loop's ``forward_backward``/``optimizer_step``, so the
``num_items`` contract holds: the split into micro-batches does not change the update.

With N processes each rank holds the units of its own prompts. The minibatches are drawn from
one permutation of *all* ranks' units (the same generator on every rank), each rank training
on those of its own: the update is the one-process update of the concatenated units. With
``train.sharding: fsdp`` the model is sharded here (``sharding.py``) and a rank with fewer
micro-batches in a minibatch than another runs zero-weighted ones (FSDP2's forwards and
backwards are collectives).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from alignlab.core.config import TrainSection
from alignlab.core.runtime import pick_device, resolve_precision
from alignlab.engine import distributed, sharding, zero, zero3
from alignlab.engine.loop import (
    Algorithm,
    build_optimizer,
    build_scheduler,
    forward_backward,
    optimizer_step,
)
from alignlab.models.checkpointing import enable_gradient_checkpointing


@dataclass
class Units:
    """``n`` prepared training units and how to make a micro-batch of some of them."""

    n: int
    take: Callable[[torch.Tensor], dict[str, Any]]
    """Indices (a 1-D long tensor) → a micro-batch the objective accepts."""


def rows_of(batch: dict[str, torch.Tensor]) -> Units:
    """The rows of a dict of row-aligned tensors (``[B, ...]`` each) as units."""
    n = next(iter(batch.values())).shape[0]
    return Units(n, lambda idx: {k: v[idx] for k, v in batch.items()})


class Learner:
    """Owns the trained model, its optimizer and schedule; ``update(units) -> metrics``.

    ``extra_groups`` are parameter groups trained by the same optimizer (a shared critic's
    value head with its own lr), ``extra_modules`` the modules they belong to: under FSDP2 they
    stay whole on every rank, under ZeRO they join the engine's partitions (stage 3 gathers a
    module's weights in that module's forward). The LR schedule advances once per ``update``."""

    def __init__(self, model: torch.nn.Module, objective: Algorithm, cfg: TrainSection, *,
                 epochs: int = 1, minibatch_size: int | None = None,
                 micro_batch_size: int | None = None, seed: int = 0,
                 extra_groups: tuple[dict[str, Any], ...] = (),
                 extra_modules: tuple[torch.nn.Module, ...] = ()) -> None:
        self.model, self.objective, self.cfg = model, objective, cfg
        self.device = pick_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        model.to(self.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model, cfg.gradient_checkpointing)
        # parameters outside the model (a shared critic's value head) stay whole on every rank
        # under FSDP2, their gradients summed like data parallel's (``optimizer_step``)
        self.sharded = sharding.shard(model, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg)
        for group in extra_groups:
            self.optimizer.add_param_group({"weight_decay": 0.0, **group})
            self.params += list(group["params"])
        if not self.sharded:  # sharding took rank 0's weights already
            distributed.broadcast([*model.parameters(), *model.buffers(), *self.params])
        self.optimizer = zero.wrap(model, self.optimizer, cfg, extra_modules)  # DeepSpeed ZeRO
        self.scheduler = build_scheduler(zero.torch_optimizer(self.optimizer), cfg)
        self.epochs, self.minibatch_size = epochs, minibatch_size
        self.micro_batch_size = micro_batch_size or cfg.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0

    def update(self, units: Units) -> dict[str, float]:
        """``epochs`` passes over shuffled minibatches, one optimizer step each; one LR step."""
        self.model.train()
        n, offset, many = units.n, 0, distributed.active()
        if many:  # the units of all ranks, this rank's from ``offset``
            counts = [int(c) for c in distributed.gather(units.n)]
            n, offset = sum(counts), sum(counts[:distributed.rank()])
        mb = min(self.minibatch_size or n, n)
        sums: dict[str, float] = {}
        count = 0
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, mb):
                idx = order[start:start + mb]
                if many:
                    idx = idx[(idx >= offset) & (idx < offset + units.n)] - offset
                # A minibatch's gradient does not depend on the order of its units; in index
                # order each micro-batch holds whole groups (a prompt's completions are
                # adjacent), which prefix sharing computes once per prompt.
                idx = idx.sort().values
                micro = [units.take(idx[j:j + self.micro_batch_size])
                         for j in range(0, len(idx), self.micro_batch_size)]
                micro = [m for m in micro if self.objective.num_items(m) > 0]
                if not micro and not many:
                    continue
                window = forward_backward(self.model, self.objective, micro, self.device,
                                          self.precision, step=self.updates + 1, allow_empty=True,
                                          padding=self._padding(micro, units),
                                          optimizer=self.optimizer)
                if window is None:  # no rank had anything to learn from in this minibatch
                    continue
                loss, _, metrics = window
                grad_norm = optimizer_step(self.params, self.optimizer, self.cfg.max_grad_norm,
                                           step=self.updates + 1)
                self.updates += 1
                count += 1
                for k, v in {"loss": loss, "grad_norm": float(grad_norm), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v
        self.scheduler.step()
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["optimizer_steps"] = count
        return out

    def _padding(self, micro: list[dict[str, Any]], units: Units) -> list[dict[str, Any]]:
        """Under FSDP2 and ZeRO-2 (collectives in every backward): as many copies of one unit as
        this rank runs fewer micro-batches than the rank with the most (``forward_backward``
        weights them 0). A rank with no unit of its own pads with one of the first rank that
        has units."""
        if not (self.sharded or zero.even_backwards(self.optimizer)):
            return []
        counts = distributed.gather((len(micro), units.n))
        most = max(c for c, _ in counts)
        sample = units.take(torch.arange(1)) if units.n else None
        if any(c < most and n == 0 for c, n in counts):  # every rank takes part in the gather
            donated = next(u for u in distributed.gather(sample) if u is not None)
            sample = sample if sample is not None else donated
        return [sample] * (most - len(micro)) if len(micro) < most else []

    def snapshot(self) -> dict[str, Any]:
        """This rank's own copy of the weights, optimizer and schedule, on the CPU, for
        :meth:`restore` in the same run (EGPO's extrapolation step is undone so): no collective,
        FSDP2's shards and ZeRO's partition as this rank holds them."""
        # ZeRO-3's weights are partitions the optimizer's own state restores
        weights = None if zero3.partitioned(self.model) else _to_cpu(self.model.state_dict())
        return {"weights": weights, "optimizer": _to_cpu(zero.local_state_dict(self.optimizer)),
                "scheduler": copy.deepcopy(self.scheduler.state_dict())}

    def restore(self, snap: dict[str, Any]) -> None:
        """Back to a :meth:`snapshot`: the weights in place (the optimizer's tensors stay)."""
        if snap["weights"] is not None:
            self.model.load_state_dict(snap["weights"])
        zero.load_local_state_dict(self.optimizer, snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": sharding.optimizer_state_dict(self.model, self.optimizer),
                "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sharding.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])


def _to_cpu(state: Any) -> Any:
    """A deep copy of ``state`` with every tensor (DTensor shards too) detached and on the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return copy.deepcopy(state)
