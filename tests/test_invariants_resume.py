"""Invariant: an fp32 run killed after a step past its last checkpoint and resumed
(``train.resume``) logs the same per-step losses and ends with the same weights as the
uninterrupted run, and the same metrics, for SFT, DPO, the reward model and GRPO (issue 15).

Bit-identical: the resumed run redoes the steps after the checkpoint with the checkpointed
weights, optimizer, schedule, RNG and data position, the same operations in the same order.
The LoRA runs of SFT and DPO (with dropout, so the RNG must resume) are
``test_reproducibility.py::test_lora_resume_equals_the_uninterrupted_run``; here the full
weights of all four families, and the losses of every step.
"""

from __future__ import annotations

import pytest

from tests.invariant_runs import FAMILIES, difference


@pytest.mark.parametrize("family", FAMILIES)
def test_killed_and_resumed_run_equals_the_uninterrupted_one(family, family_runs):
    whole = family_runs.run(family)
    resumed = family_runs.resumed(family, kill_after=3, save_every=2)  # resumes from step 2
    assert sorted(resumed.metrics) == [1, 2, 3, 4]
    d = difference(whole, resumed)
    assert d.loss == d.weight == d.metric == 0.0, d
