"""Preference data columns: baselines, group ids, collation of ties/groups/rewards and of the
per-token and multi-reference log-probs."""

from __future__ import annotations

import pytest
import torch

from alignlab.data.preference_batches import collate_groups
from alignlab.data.preference_columns import assign_group_ids, attach_values


def test_prompt_mean_baseline_leaves_the_row_out():
    train = [{"prompt_ids": [1], "reward": r} for r in (1.0, 2.0, 6.0)] + \
            [{"prompt_ids": [2], "reward": 3.0}]
    held = [{"prompt_ids": [1], "reward": 0.0}, {"prompt_ids": [9], "reward": 0.0}]
    attach_values(train, held, "prompt_mean")
    assert [e["value"] for e in train] == [4.0, 3.5, 1.5, 3.0]  # prompt 2 seen once: global mean
    assert [e["value"] for e in held] == [3.0, 3.0]
    attach_values(train, held, "zero")
    assert {e["value"] for e in train + held} == {0.0}


def test_groups_get_sorted_ids_and_shares():
    examples = [{"group": g} for g in ("b", "a", "b", 2)]
    names, shares = assign_group_ids(examples)
    assert names == [2, "a", "b"] and shares == pytest.approx([0.25, 0.25, 0.5])
    assert [e["group_id"] for e in examples] == [2, 1, 2, 0]


def test_collate_adds_columns_and_reference_extras_slot_major():
    ex = [{"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6], "tie": True,
           "group_id": 1, "ref_logps": [-1.0, -2.0], "ref_logps_multi": [[-1.0, -1.5], [-2.0, -2.5]],
           "ref_token_logps": [-0.1, -0.2, -0.3, -0.4]},
          {"prompt_ids": [1], "chosen_ids": [7], "rejected_ids": [8, 9], "group_id": 0,
           "ref_logps": [-3.0, -4.0], "ref_logps_multi": [[-3.0, -3.5], [-4.0, -4.5]],
           "ref_token_logps": [-0.5, -0.6, -0.7]}]
    batch = collate_groups(ex, 0, layout="flat")
    assert batch["ties"].tolist() == [True, False] and batch["groups"].tolist() == [1, 0]
    assert batch["ref_logps_multi"][:, 1].tolist() == [-1.5, -3.5, -2.5, -4.5]
    assert torch.allclose(batch["ref_token_logps"], torch.tensor(
        [[-0.1, -0.2, -0.3], [-0.5, 0, 0], [-0.4, 0, 0], [-0.6, -0.7, 0]]))
