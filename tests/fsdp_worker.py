"""One rank of an FSDP2 run of the invariant families (``tests/test_sharding.py``).

Launched like ``tests/ddp_worker.py`` (``python -m torch.distributed.run --standalone
--nproc-per-node N -m tests.fsdp_worker OUT PLAN``) with ``ACCELERATE_USE_FSDP=true`` and
``FSDP_VERSION=2`` in the environment, as ``accelerate launch`` with
``configs/accelerate/fsdp2.yaml`` sets them: every run of ``PLAN`` shards its model. First the
sharding helpers are checked on the tiny world's model (``checks``); rank 0 saves everything to
``OUT/outcomes.pt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from alignlab.core.config import TrainSection
from alignlab.engine import distributed, sharding
from alignlab.world.resolve import resolve_model_path

from tests.invariant_runs import FamilyRuns, run_plan_on_ranks


def checks(base: str) -> dict[str, object]:
    """``shard`` keeps 1/N of every weight here and sums the gradients over the ranks;
    ``full_weights`` lets the ranks run different numbers of forwards; the full state dict is
    the unsharded model's."""
    from transformers import AutoModelForCausalLM

    from alignlab.models.logprobs import token_logprobs

    r = distributed.rank()
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert sharding.shard(model, TrainSection(sharding="fsdp", device="cpu"))
    full = sum(p.numel() for p in plain.parameters())
    local = sum(p.to_local().numel() for p in model.parameters())
    batches = [{"input_ids": torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(s)),
                "loss_mask": torch.ones(2, 9, dtype=torch.long)} for s in (0, 1)]
    # each rank its own rows; the sharded gradient is the sum of both ranks' plain gradients
    token_logprobs(model, batches[r]).sum().backward()
    for b in batches:
        token_logprobs(plain, b).sum().backward()
    grad_error = max(float((p.grad.full_tensor() - q.grad).abs().max() / q.grad.abs().max())
                     for p, q in zip(model.parameters(), plain.parameters()))  # relative
    norm = sharding.grad_norm(list(model.parameters()), None)
    plain_norm = torch.nn.utils.get_total_norm([q.grad for q in plain.parameters()])
    with sharding.full_weights(model), torch.no_grad():  # rank 1 runs 3 more forwards
        outs = [token_logprobs(model, batches[0]) for _ in range(1 + 3 * r)]
    forward_error = float((outs[-1] - token_logprobs(plain, batches[0]).detach()).abs().max())
    state = sharding.full_state_dict(model)
    state_error = (max(float((state[k] - v).abs().max()) for k, v in plain.state_dict().items())
                   if r == 0 else None)
    # the online learner's uneven ranks: rank 0 one micro-batch and a zero-weighted padding
    # one, rank 1 two micro-batches; the gradient is the plain one of the three micro-batches
    from alignlab.engine.loop import forward_backward
    from alignlab.engine.objectives import NLLObjective

    for p in [*model.parameters(), *plain.parameters()]:
        p.grad = None
    micro = [batches[0]] if r == 0 else [batches[1], batches[1]]
    padding = [batches[1]] if r == 0 else []
    loss, items, _ = forward_backward(model, NLLObjective(), micro, torch.device("cpu"),
                                      padding=padding)
    with distributed.local():  # one process's run of all three
        plain_loss, _, _ = forward_backward(plain, NLLObjective(),
                                            [batches[0], *[batches[1]] * 2], torch.device("cpu"))
    padding_error = max(float((p.grad.full_tensor() - q.grad).abs().max() / q.grad.abs().max())
                        for p, q in zip(model.parameters(), plain.parameters()))
    return {"local_fraction": local / full, "grad_error": grad_error,
            "padding_error": padding_error, "padding_loss_error": abs(loss - plain_loss),
            "items": items,
            "norm_error": abs(float(norm) / float(plain_norm) - 1), "forward_error": forward_error,
            "state_error": state_error, "state_keys": sorted(state) if r == 0 else state}


def main(out: Path, plan: list[list]) -> None:
    assert distributed.setup("cpu"), "launched without WORLD_SIZE > 1"
    assert sharding.accelerate_fsdp(), "launched without accelerate's FSDP2 environment"
    runs = FamilyRuns(os.environ["ALIGNLAB_TEST_CACHE"], out)
    base = resolve_model_path("world:base", runs.world)
    outcomes: dict[str, object] = {"checks": distributed.gather(checks(base))}
    run_plan_on_ranks(runs, plan, out, outcomes)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
