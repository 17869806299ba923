"""Invariants: the batch layout and the log-prob fast paths change the arithmetic, not the
training (issue 15). For SFT, DPO, the reward model and GRPO, runs that differ only in

- the layout: padded vs packed (``data.packing``; SFT, DPO, reward), prefix-shared vs not
  (``preference.prefix_sharing`` for DPO; ``rl.prefix_sharing`` for GRPO, and the flat pair
  batches of the reward model, which ``sequence_values`` shares);
- the fast paths: on vs off (``alignlab.models.logprobs.fast_paths_off``), where a run takes one
  (``group_pass``, ``per_sequence``) and off it takes the plain forward;

give the same per-step losses and final weights within ``LOSS_TOL``/``WEIGHT_TOL``
(``invariant_runs.py``: float32 rounding through AdamW). Each test also checks the paths that
ran, so it compares the paths it names. Tiny batches skip fewer positions than
``MIN_SKIPPED_TOKENS``, so flat batches are made to share (``share_small``) where that is tested.
"""

from __future__ import annotations

import pytest

from tests.invariant_runs import assert_equivalent

# family -> [(options of a run, the log-prob paths it must take)]; the first is the baseline.
LAYOUTS = {
    "sft": [({}, {"plain"}), ({"packing": True}, {"per_sequence"})],
    "dpo": [({}, {"group_pass"}), ({"sharing": False}, {"plain"}),
            ({"packing": True}, {"per_sequence"})],
    "reward": [({}, {"plain"}), ({"share_small": True}, {"group_pass"}),
               ({"packing": True}, {"per_sequence"})],
    "grpo": [({}, {"plain"}), ({"share_small": True}, {"group_pass"})],
}


def _name(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


def _layout_cases():
    for family, runs in LAYOUTS.items():
        (base, base_paths), *others = runs
        for options, paths in others:
            yield pytest.param(family, base, base_paths, options, paths,
                               id=f"{family}-{_name(base)}-vs-{_name(options)}")


@pytest.mark.parametrize("family,base,base_paths,options,paths", list(_layout_cases()))
def test_layouts_train_alike(family, base, base_paths, options, paths, family_runs):
    a, b = family_runs.run(family, **base), family_runs.run(family, **options)
    assert a.paths == base_paths and paths <= b.paths, (a.paths, b.paths)
    assert_equivalent(a, b)


# Each run that takes a fast path, against the same configuration with the fast paths off.
FAST = [("sft", {"packing": True}), ("dpo", {}), ("reward", {"packing": True}),
        ("grpo", {"share_small": True}),
        pytest.param("dpo", {"packing": True}, marks=pytest.mark.slow),
        pytest.param("reward", {"share_small": True}, marks=pytest.mark.slow)]


@pytest.mark.parametrize("family,options", FAST, ids=lambda v: _name(v) if isinstance(v, dict) else v)
def test_fast_paths_off_train_like_on(family, options, family_runs):
    on = family_runs.run(family, **options)
    off = family_runs.run(family, fast=False, **options)
    assert on.paths - {"plain"} and off.paths == {"plain"}, (on.paths, off.paths)
    assert_equivalent(on, off)
