"""DeepSpeed ZeRO stages 1, 2 and 3 under alignlab's loop (``train.sharding: zero1|zero2|zero3``,
or ``accelerate launch`` with ``configs/accelerate/zero2.yaml`` / ``zero3.yaml``).

ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models"): stage 1 partitions the AdamW moments and the fp32 master weights over the N
processes, stage 2 the gradients too; every rank keeps the whole model's weights, so the
log-prob fast paths, rollouts and ``final/`` work as in data parallel. DeepSpeed's engine
(``deepspeed.initialize`` with alignlab's torch AdamW as the client optimizer) does the
partitioned reduction, the clipping and the step; alignlab's loop keeps its own micro-batches,
normalisation and schedule:

- ``managed_gradient_accumulation: false``: the loop's ``step()`` is DeepSpeed's accumulation
  boundary, so a window of any number of micro-batches is one optimizer step (the online
  learner's windows differ between steps). Stage 2 reduces gradients inside each backward, so
  its ranks run the same number of backward passes (the learner pads, as under FSDP2);
- DeepSpeed *averages* the gradients over the ranks, the loop's normalisation expects their
  *sum* (each rank divides by the global item count): the loss is multiplied by N;
- DeepSpeed clips to ``train.max_grad_norm`` and skips a step whose gradient is not finite;
  the loop then stops with an error (the weights were not updated);
- the checkpoint holds every rank's partition of the optimizer state (DeepSpeed's own
  ``state_dict``, its non-tensor objects left out so ``trainer_state.pt`` still loads with
  ``weights_only=True``); a resumed run needs the same number of processes.

Stage 3 partitions the weights too: what that changes (no fast paths, gathered weights for
sampling and checkpoints) is in ``engine/zero3.py``. A DeepSpeed config's own ``optimizer``,
``scheduler``, ``fp16`` and ``bf16`` sections are refused (alignlab's ``train.*`` decides those).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alignlab.core.config import TrainSection
from alignlab.core.errors import ConfigError, NonFiniteError
from alignlab.engine import distributed, zero3

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
# what DeepSpeed's state_dict holds that is not a tensor or plain data (rebuilt on load)
_OBJECTS = ("loss_scaler", "param_slice_mappings")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("true", "1")


def launch_config() -> dict[str, Any] | None:
    """The DeepSpeed settings ``accelerate launch`` put in the environment (its JSON config file
    when it names one), None when it asked for no DeepSpeed."""
    if not _truthy("ACCELERATE_USE_DEEPSPEED"):
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path.lower() != "none":
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"deepspeed_config_file {path}: cannot be read as JSON: {exc}") from None
    zero: dict[str, Any] = {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
    offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    if offload != "none":
        zero["offload_optimizer"] = {"device": offload}
    out: dict[str, Any] = {"zero_optimization": zero}
    # accelerate always passes the plugin's accumulation (default 1): only another value says
    # something, which must then match train.grad_accum
    steps = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if steps not in ("1", "", "none"):
        out["gradient_accumulation_steps"] = int(steps)
    clipping = os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "none").lower()
    if clipping not in ("none", ""):
        out["gradient_clipping"] = float(clipping)
    return out


def stage(cfg: TrainSection) -> int:
    """The ZeRO stage the run asks for (``train.sharding`` or an accelerate DeepSpeed launch);
    0 for none."""
    launched = launch_config()
    if launched is not None:
        if cfg.sharding == "fsdp":
            raise ConfigError("field 'train.sharding': 'fsdp' while accelerate launch asks for "
                              "DeepSpeed; choose one")
        return int(launched.get("zero_optimization", {}).get("stage", 0))
    return STAGES.get(cfg.sharding, 0)


def check(cfg: TrainSection, processes: int) -> int:
    """Refuse, before anything is loaded, a DeepSpeed setting alignlab does not run; the stage."""
    s = stage(cfg)
    if not s:
        return 0
    if s not in (1, 2, 3):
        raise ConfigError(f"zero_optimization.stage: {s}; alignlab runs DeepSpeed ZeRO stages 1, "
                          "2 and 3")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(f"field 'train.sharding': ZeRO stage {s} needs DeepSpeed, which is not "
                          "installed: pip install 'alignlab[deepspeed]' (or pip install "
                          "deepspeed); or use train.sharding=fsdp") from None
    ds_config(cfg, processes)  # its own refusals, before anything is loaded
    return s


def ds_config(cfg: TrainSection, processes: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: the launch's (or ``{"zero_optimization": {"stage": s}}``)
    with the batch, accumulation and clipping set from ``train.*``. A value of the launch's
    config that contradicts ``train.*`` is refused with both names (``"auto"`` is filled)."""
    user = launch_config() or {"zero_optimization": {"stage": STAGES[cfg.sharding]}}
    for section in ("optimizer", "scheduler", "fp16", "bf16"):
        if section in user and (section not in ("fp16", "bf16")
                                or user[section].get("enabled") not in (False, "auto")):
            raise ConfigError(f"DeepSpeed config section '{section}': alignlab builds AdamW and "
                              "its schedule from train.lr/adam_betas/weight_decay/lr_scheduler and "
                              "its precision from train.precision; remove the section")
    micro = max(1, cfg.batch_size // max(1, processes))
    # what a DeepSpeed config may say, in DeepSpeed's terms, and the alignlab field it must match
    expected = {"train_micro_batch_size_per_gpu": (micro, "train.batch_size / processes"),
                "gradient_accumulation_steps": (cfg.grad_accum, "train.grad_accum"),
                "train_batch_size": (cfg.batch_size * cfg.grad_accum,
                                     "train.batch_size × train.grad_accum"),
                "gradient_clipping": (float(cfg.max_grad_norm or 0.0), "train.max_grad_norm")}
    for key, (value, field) in expected.items():
        given = user.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise ConfigError(f"DeepSpeed config '{key}': {given}, but alignlab's {field} gives "
                              f"{value}; set it to {value} or 'auto'")
    # The loop accumulates its own micro-batches and calls step() once per window (the
    # boundary, managed_gradient_accumulation off), so DeepSpeed sees one micro-batch per step.
    ours = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "train_batch_size": micro * max(1, processes),
            "gradient_clipping": expected["gradient_clipping"][0]}
    return {**user, **ours, "managed_gradient_accumulation": False,
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


class _Objective(torch.nn.Module):
    """The module DeepSpeed's engine runs: an algorithm's loss on the model. The engine's
    forward marks its outputs so their backward pass enters ZeRO's gradient hooks (the log-prob
    interface calls the model's sub-modules, which the engine would not see)."""

    def __init__(self, model: torch.nn.Module, extra: list[torch.nn.Parameter],
                 extra_modules: tuple[torch.nn.Module, ...] = ()) -> None:
        super().__init__()
        self.model = model
        # what the optimizer trains beside the model (a shared critic's value head): registered
        # here too, so the engine partitions and reduces it with the model's weights; its
        # modules (stage 3 gathers a module's weights in that module's own forward)
        self.extra_modules = torch.nn.ModuleList(extra_modules)
        inside = {id(p) for m in extra_modules for p in m.parameters()}
        self.extra = torch.nn.ParameterList([p for p in extra if id(p) not in inside])
        self.algorithm: Any = None

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.algorithm.loss(self.model, batch)
        return out.loss_sum, out.metrics


class ZeroOptimizer:
    """A DeepSpeed engine seen as the loop's optimizer: ``loss`` (the forward through the
    engine), ``backward``, ``step`` (reduce, clip, update, zero the gradients), and the state of
    every rank's partition."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainSection,
                 zero_stage: int, extra: list[torch.nn.Parameter] | None = None,
                 extra_modules: tuple[torch.nn.Module, ...] = ()) -> None:
        import deepspeed

        # DeepSpeed flattens each group: an empty one (no no-decay parameter) has nothing to hold
        opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]
        self.base, self.stage = opt, zero_stage
        self.processes = distributed.world_size()
        self.objective = _Objective(model, extra or [], extra_modules)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.objective, optimizer=opt, config=ds_config(cfg, self.processes),
            dist_init_required=False)
        if zero_stage == 3:
            zero3.register(model, self.optimizer)
        if distributed.is_main():
            parts = {1: "AdamW state", 2: "AdamW state and gradients",
                     3: "weights, gradients and AdamW state"}[zero_stage]
            print(f"train.sharding zero{zero_stage}: DeepSpeed ZeRO stage {zero_stage} over "
                  f"{self.processes} processes ({parts} partitioned)")

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def loss(self, algorithm: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """``algorithm.loss(model, batch)`` run by the engine: (loss sum, metrics)."""
        self.objective.algorithm = algorithm
        return self.engine(batch)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages over the ranks; the loop's loss is already this rank's share of
        # the global sum, so N times it averages to that sum
        self.engine.backward(loss * self.processes, scale_wrt_gas=False)

    def step(self, step: int = 0) -> torch.Tensor:
        """Reduce, clip and apply the window's gradient; its norm (before clipping)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if norm is None else float(norm))
        if not torch.isfinite(norm):
            raise NonFiniteError(f"step {step}: the gradient norm is {norm.item()}; training "
                                 "stopped (DeepSpeed skipped the update, the weights are those "
                                 "of the step before).")
        return norm

    def state_dict(self) -> dict[str, Any]:
        """Every rank's partition on rank 0, which writes the checkpoint (``partitions`` is None
        on the others); a collective: every rank must call it."""
        own = {k: v for k, v in self.optimizer.state_dict().items() if k not in _OBJECTS}
        if "zero_stage" in own:  # an IntEnum: weights_only loading takes the int
            own["zero_stage"] = int(own["zero_stage"])
        return {"zero_stage": self.stage, "partitions": distributed.gather_to_main(own)}

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's partition alone (no collective; in memory, DeepSpeed's objects kept), for
        :meth:`load_local_state_dict`."""
        return self.optimizer.state_dict()

    def load_local_state_dict(self, own: dict[str, Any]) -> None:
        """Back to this rank's partition of :meth:`local_state_dict`. Stages 1 and 2 merge the
        partitions they are given and take this rank's slice: given this rank's own in every
        slot, the slice is its own (the partitions are of equal, aligned size); stage 3 takes
        this rank's slot."""
        self._load([own] * self.processes)

    def _load(self, parts: list[dict[str, Any]]) -> None:
        # stage 3 as DeepSpeed's engine loads it: every weight partitioned first, the small
        # weights it keeps gathered ("persistent") gathered again after
        if self.stage == 3:
            self.optimizer.checkpoint_event_prologue()
        self.optimizer.load_state_dict(parts, load_from_fp32_weights=True)
        if self.stage == 3:
            self.optimizer.checkpoint_event_epilogue()

    def _with_objects(self, part: dict[str, Any]) -> dict[str, Any]:
        """A partition read from a checkpoint, with the objects left out of it (``_OBJECTS``)
        taken from this run's optimizer (stage 3 reads its loss scaler back)."""
        return {**{k: getattr(self.optimizer, k) for k in _OBJECTS if hasattr(self.optimizer, k)},
                **part}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state.get("partitions")
        if parts is None:
            raise ConfigError("train.resume: the checkpoint's optimizer state is not DeepSpeed "
                              "ZeRO's (it was written without train.sharding zero1/zero2); "
                              "resume it with the sharding it was written with")
        if len(parts) != self.processes or state.get("zero_stage") != self.stage:
            raise ConfigError(f"train.resume: the checkpoint holds ZeRO stage "
                              f"{state.get('zero_stage')} partitions of {len(parts)} processes; "
                              f"resume it with {len(parts)} processes and that stage (this run: "
                              f"stage {self.stage}, {self.processes} processes)")
        # the fp32 master partitions come from the checkpoint, not from the weights
        self._load([self._with_objects(p) for p in parts])


def wrap(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainSection,
         extra_modules: tuple[torch.nn.Module, ...] = ()) -> torch.optim.Optimizer | ZeroOptimizer:
    """``opt`` under DeepSpeed ZeRO when the run asks for it and several processes run; else
    ``opt`` itself. Call after the replicas took rank 0's weights. ``extra_modules``: the
    modules of the parameters ``opt`` trains outside ``model``."""
    s = stage(cfg)
    if not s or not distributed.active():
        return opt
    own = {id(p) for p in model.parameters()}
    extra = [p for g in opt.param_groups for p in g["params"] if id(p) not in own]
    return ZeroOptimizer(model, opt, cfg, s, extra, extra_modules)


def even_backwards(opt: Any) -> bool:
    """Whether every rank must run the same number of backward passes per step (stage 2
    reduce-scatters inside each one)."""
    return isinstance(opt, ZeroOptimizer) and opt.stage >= 2


def backward_of(opt: Any) -> Callable[[torch.Tensor], None]:
    """How the loop runs a backward pass for ``opt``: through DeepSpeed's engine, or plainly."""
    return opt.backward if isinstance(opt, ZeroOptimizer) else torch.Tensor.backward


def loss_of(opt: Any, algorithm: Any, model: torch.nn.Module,
            batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """``algorithm.loss(model, batch)`` as (loss sum, metrics): through DeepSpeed's engine for a
    ``ZeroOptimizer``, else directly."""
    if isinstance(opt, ZeroOptimizer):
        return opt.loss(algorithm, batch)
    out = algorithm.loss(model, batch)
    return out.loss_sum, out.metrics


def local_state_dict(opt: Any) -> dict[str, Any]:
    """``opt``'s state as this rank holds it (no collective): ZeRO's own partition, else
    ``opt.state_dict()`` (FSDP2's shards are this rank's)."""
    return opt.local_state_dict() if isinstance(opt, ZeroOptimizer) else opt.state_dict()


def load_local_state_dict(opt: Any, state: dict[str, Any]) -> None:
    """Load what :func:`local_state_dict` gave, on the same rank of the same run."""
    if isinstance(opt, ZeroOptimizer):
        opt.load_local_state_dict(state)
    else:
        opt.load_state_dict(state)


def torch_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer whose parameter groups carry the learning rate (for the schedule)."""
    return opt.base if isinstance(opt, ZeroOptimizer) else opt


__all__ = ["STAGES", "ZeroOptimizer", "backward_of", "check", "ds_config", "even_backwards", "launch_config",
           "load_local_state_dict", "local_state_dict", "loss_of", "stage", "torch_optimizer", "wrap"]
