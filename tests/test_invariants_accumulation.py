"""Invariant: k micro-batches of b accumulated into one optimizer step train like one batch of
k·b, for SFT, DPO, the reward model and GRPO (issue 15; TRL runs the same checks on GPUs).

The loop divides every micro-batch's loss *sum* by the item count of the whole accumulation
window (tokens, pairs: ``engine/loop.py``), so the split changes nothing but the
order of float32 sums. GRPO has no ``grad_accum``: ``rl.minibatch_size`` fixes the completions
per optimizer step and ``train.batch_size`` is the micro-batch, so the same check varies that.

Tolerances (``invariant_runs.py`` says why, with what was measured): losses 1e-5 absolute;
weights 1e-2 of the update per tensor and 1e-3 (= lr) per coordinate; invariant metrics 1e-4.
"""

from __future__ import annotations

import pytest

from tests.invariant_runs import FAMILIES, assert_equivalent

SPLITS = [(4, 2), (2, 4)]  # (micro-batch, accumulation) against (8, 1)


def _cases():
    for family in FAMILIES:
        for micro, accum in SPLITS:
            # GRPO's runs sample, so they cost several times an offline run: one split by default.
            slow = family == "grpo" and micro == 2
            yield pytest.param(family, micro, accum, id=f"{family}-{micro}x{accum}",
                               marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("family,micro,accum", list(_cases()))
def test_accumulated_micro_batches_train_like_one_batch(family, micro, accum, family_runs):
    whole = family_runs.run(family)
    split = family_runs.run(family, micro=micro, accum=accum)
    assert_equivalent(whole, split)
