"""Per-example inputs of the preference losses besides the completions: data columns and the
extra reference log-probs, checked against the rows, normalised and collated.

Data columns (validated by :mod:`alignlab.data.formats`):

- ``tie`` (preference rows, bool; a row without it is no tie) → ``ties [B]`` (DPO with ties);
- ``group`` (preference rows, str or int) → ``group_id`` → ``groups [B]``, ids numbering the
  sorted group names (group-robust DPO);
- ``reward`` (unpaired rows, number) → ``rewards [B]`` and the baseline ``value`` → ``values
  [B]`` (DRO), see :func:`attach_values`.

Reference extras set by the trainer (``trainers/preference_inputs.py``), both per example:

- ``ref_logps_multi``: one list of M reference log-probs per completion slot → ``[N, M]``;
- ``ref_token_logps``: the per-token reference log-probs of the slots, concatenated in slot
  order → ``[N, C]`` (left-aligned, 0 past a completion's end).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from alignlab.core.errors import ConfigError
from alignlab.data.loading import RowSet

# The data column behind each PreferenceInputs field that comes from the rows.
INPUT_COLUMNS = {"labels": "label", "margin": "margin", "ties": "tie", "groups": "group",
                 "rewards": "reward"}
# Columns whose absence on one row means something (no tie); only a data set with none of them
# is refused.
ROW_DEFAULTS: dict[str, Any] = {"tie": False}
VALUE_BASELINES = ("prompt_mean", "mean", "zero")


def check_columns(rows: RowSet, needed: dict[str, list[str]]) -> None:
    """Every row carries each column a loss needs (``needed``: column → loss names), else a
    ``DataError`` ``file:line: field 'x'`` naming the loss."""
    for column, losses in needed.items():
        names = ", ".join(losses)
        if column in ROW_DEFAULTS:
            if not any(column in row for row in rows):
                raise ConfigError(f"field 'preference.loss': {names} need(s) a {column!r} column "
                                  f"in data.source {rows.source}, and no row has one")
            continue
        for i, row in enumerate(rows):
            if column not in row:
                raise rows.error(i, f"is missing (loss {names} needs it)", column)


def fill_defaults(examples: list[dict[str, Any]], columns: Sequence[str]) -> None:
    for column in columns:
        if column in ROW_DEFAULTS:
            for e in examples:
                e.setdefault(column, ROW_DEFAULTS[column])


def assign_group_ids(examples: list[dict[str, Any]]) -> tuple[list[str | int], list[float]]:
    """Set ``group_id`` (the index of the example's ``group`` among the sorted group names);
    return the names and each group's share of the examples. Strings and integers are
    different names (``1`` ≠ ``"1"``)."""
    names = sorted({e["group"] for e in examples}, key=lambda g: (isinstance(g, str), g))
    index = {g: i for i, g in enumerate(names)}
    counts = [0] * len(names)
    for e in examples:
        e["group_id"] = index[e["group"]]
        counts[e["group_id"]] += 1
    return names, [c / len(examples) for c in counts]


def attach_values(train: list[dict[str, Any]], others: list[dict[str, Any]], baseline: str) -> None:
    """Set ``value`` = V(x), DRO's baseline, from the training rows' rewards.

    ``prompt_mean``: the mean reward of the *other* training rows with the same prompt (a
    leave-one-out Monte-Carlo estimate of E[r | x] under the data's policy, so a row's own
    reward never sits in its baseline), the mean over all training rows for a prompt seen once;
    ``mean``: that global mean; ``zero``: 0. ``others`` (held-out rows) use the training rows'
    means."""
    if baseline not in VALUE_BASELINES:
        raise ConfigError(f"field 'preference.value_baseline': got {baseline!r}; allowed values: "
                          f"{', '.join(VALUE_BASELINES)}")
    if baseline == "zero":
        for e in [*train, *others]:
            e["value"] = 0.0
        return
    overall = statistics.fmean(float(e["reward"]) for e in train)
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in train:
        s = sums[tuple(e["prompt_ids"])]
        s[0] += float(e["reward"])
        s[1] += 1
    for e in train:
        total, count = sums[tuple(e["prompt_ids"])]
        loo = count > 1 and baseline == "prompt_mean"
        e["value"] = (total - float(e["reward"])) / (count - 1) if loo else overall
    for e in others:
        total, count = sums.get(tuple(e["prompt_ids"]), (0.0, 0))
        e["value"] = total / count if count and baseline == "prompt_mean" else overall


def add_column_fields(batch: dict[str, Any], examples: Sequence[dict[str, Any]]) -> None:
    """Collate the columns and reference extras above into ``batch`` (slot-major, like
    :func:`alignlab.data.preference_batches.collate_groups`)."""
    first = examples[0]
    if "tie" in first:
        batch["ties"] = torch.tensor([bool(e.get("tie", False)) for e in examples])
    for key, name, dtype in (("group_id", "groups", torch.long), ("reward", "rewards", torch.float32),
                             ("value", "values", torch.float32)):
        if all(key in e for e in examples):
            batch[name] = torch.tensor([e[key] for e in examples], dtype=dtype)
    owner, slot = batch["owner"].tolist(), batch["slot"].tolist()
    if "ref_logps_multi" in first:
        batch["ref_logps_multi"] = torch.tensor(
            [examples[b]["ref_logps_multi"][k] for b, k in zip(owner, slot)], dtype=torch.float32)
    if "ref_token_logps" in first:
        lengths = batch["completion_lengths"].tolist()
        out = torch.zeros(len(owner), max(lengths, default=0))
        offset = [0] * len(examples)  # slot-major: each example's slots come in order
        for n, (b, length) in enumerate(zip(owner, lengths)):
            values = examples[b]["ref_token_logps"][offset[b]:offset[b] + length]
            out[n, :length] = torch.tensor(values, dtype=torch.float32)
            offset[b] += length
        batch["ref_token_logps"] = out


__all__ = ["INPUT_COLUMNS", "ROW_DEFAULTS", "VALUE_BASELINES", "add_column_fields",
           "assign_group_ids", "attach_values", "check_columns", "fill_defaults"]
