"""One rank of a data-parallel run of the invariant families (``tests/test_distributed.py``).

Launched N times by torch's elastic launcher (``python -m torch.distributed.run --standalone
--nproc-per-node N -m tests.ddp_worker OUT PLAN``): each rank joins the process group, runs
every run of ``PLAN`` (JSON: ``[[name, family, options, kill_after], ...]``) with the same
harness as the one-process invariant runs (``tests/invariant_runs.py``: unrounded per-step
metrics, the trained model's weights before and after), and rank 0 saves them to
``OUT/outcomes.pt``. ``kill_after``: the run is killed after that step and resumed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from alignlab.engine import distributed

from tests.invariant_runs import FamilyRuns, run_plan_on_ranks


def collectives() -> dict[str, object]:
    """The helpers of ``engine/distributed.py`` on rank-dependent inputs (checked by the test)."""
    r = distributed.rank()
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad = torch.full((2,), float(r + 1))  # every rank: summed
    if r == 1:
        b.grad = torch.ones(2)  # one rank only: zeros elsewhere, then summed
    distributed.reduce_gradients([a, b, c])  # c: no rank, stays None

    def centre(rows):  # a statistic over the whole batch: the mean of every rank's rows
        x = rows["x"]
        return {"centred": x - x[rows["mask"].bool()].mean(), "group": rows["group"]}, x.shape

    width = 2 + r  # ranks' rows differ in width and count
    rows = {"x": torch.arange(float(width)).repeat(r + 1, 1) + 10 * r,
            "mask": torch.ones(r + 1, width), "group": torch.zeros(r + 1, dtype=torch.long)}
    own, shape = distributed.whole_batch(centre, rows, offset_keys=("group",))
    # a rank without rows (rank 1) still takes part, and lacks what only rows bring ("y")
    few = {"x": torch.ones(2, 3)} if r == 0 else {"x": torch.zeros(0, 1)}
    if r == 0:
        few["y"] = torch.ones(2)
    twice, rows_seen = distributed.whole_batch(
        lambda rows: ({"z": rows["x"] * 2 + rows["y"][:, None]}, rows["x"].shape), few)
    nothing = distributed.whole_batch(lambda rows: 1 / 0, {"x": torch.zeros(0, 2)})

    from alignlab.algorithms.preference.inputs import GroupWeights
    from alignlab.algorithms.preference.trainer import (
        PreferenceObjective,
        PreferenceSection,
        plan_losses,
    )

    weights = GroupWeights(["a", "b"], 0.5, [0.5, 0.5])
    weights.update(torch.tensor([1.0 + r, 0.0]), torch.tensor([0, 1]))  # this rank's step
    weights.sync()
    bco = PreferenceObjective(plan_losses(PreferenceSection(loss="bco")))
    bco.shift_mean, bco.shift_count = r + 2.0, 2  # this rank's rewards: r + 1, r + 3
    bco.sync_across_ranks()
    return {"twice": twice["z"].tolist(), "rows_seen": tuple(rows_seen), "nothing": nothing,
            "group_weights": weights.weights.tolist(), "shift": (bco.shift_mean, bco.shift_count),
            "a": a.grad.tolist(), "b": b.grad.tolist(), "c": c.grad,
            "global_sum": distributed.global_sum([r, 1]), "gather": distributed.gather(r),
            "any_rank": distributed.any_rank(r == 1), "shape": tuple(shape),
            "centred": own["centred"].tolist(), "group": own["group"].tolist(),
            "share": distributed.share(8, "examples", "train.batch_size")}


def main(out: Path, plan: list[list]) -> None:
    assert distributed.setup("cpu"), "launched without WORLD_SIZE > 1"
    checks = distributed.gather(collectives())
    runs = FamilyRuns(os.environ["ALIGNLAB_TEST_CACHE"], out)
    outcomes: dict[str, object] = {"collectives": checks}
    run_plan_on_ranks(runs, plan, out, outcomes)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
