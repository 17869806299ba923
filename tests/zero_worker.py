"""One rank of a DeepSpeed ZeRO run of the invariant families (``tests/test_zero.py``).

Launched like ``tests/fsdp_worker.py`` (``python -m torch.distributed.run --standalone
--nproc-per-node N -m tests.zero_worker OUT PLAN``) with the environment ``accelerate launch``
sets for ``configs/accelerate/zero2.yaml`` (``ACCELERATE_USE_DEEPSPEED=true``,
``ACCELERATE_DEEPSPEED_ZERO_STAGE``, ``ACCELERATE_GRADIENT_CLIPPING``): every run of ``PLAN``
trains under DeepSpeed. First ``checks`` measures the partition on the tiny world's model;
rank 0 saves everything to ``OUT/outcomes.pt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from alignlab.core.config import TrainSection
from alignlab.engine import distributed, zero, zero3
from alignlab.engine.loop import build_optimizer
from alignlab.world.resolve import resolve_model_path

from tests.invariant_runs import FamilyRuns, run_plan_on_ranks


def checks(base: str) -> dict[str, object]:
    """The share of the fp32 master weights (and so of the AdamW moments) this rank holds, and
    under stage 3 of the model's weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = TrainSection(device="cpu", batch_size=2)  # the stage comes from the environment
    total = sum(p.numel() for p in model.parameters())
    opt = zero.wrap(model, build_optimizer(model, cfg), cfg)
    if opt.stage == 3:  # the weights' partition (the fp32 masters and moments are as large)
        held = sum(t.numel() for t in opt.optimizer.fp32_partitioned_groups_flat)
        return {"stage": 3, "fraction": held / total, "weights": zero3.held_fraction(model)}
    held = sum(t.numel() for t in opt.optimizer.single_partition_of_fp32_groups)
    return {"stage": opt.stage, "fraction": held / total}


def main(out: Path, plan: list[list]) -> None:
    assert distributed.setup("cpu"), "launched without WORLD_SIZE > 1"
    assert zero.launch_config() is not None, "launched without accelerate's DeepSpeed environment"
    runs = FamilyRuns(os.environ["ALIGNLAB_TEST_CACHE"], out)
    base = resolve_model_path("world:base", runs.world)
    outcomes: dict[str, object] = {"checks": distributed.gather(checks(base))}
    run_plan_on_ranks(runs, plan, out, outcomes)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
