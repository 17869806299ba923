"""``docs/losses.md`` cannot go stale: one row per registered loss (aliases in the same row), and
its kind and inputs cells are what the registry declares."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from alignlab.core.registry import Registry
from alignlab.losses.online_preference import ONLINE_PREFERENCE_TERMS
from alignlab.losses.policy import LOSS_AGGREGATIONS, POLICY_LOSSES
from alignlab.losses.preference import PREFERENCE_LOSSES, loss_spec
from alignlab.losses.reward import REWARD_MODEL_LOSSES
from alignlab.losses.rollout_correction import ROLLOUT_CORRECTIONS
from alignlab.losses.value import VALUE_LOSSES

DOC = Path(__file__).resolve().parents[1] / "docs" / "losses.md"
SECTIONS = {"Preference losses": PREFERENCE_LOSSES, "Policy-gradient losses": POLICY_LOSSES,
            "Policy-loss aggregations": LOSS_AGGREGATIONS, "Rollout corrections": ROLLOUT_CORRECTIONS,
            "Reward-model losses": REWARD_MODEL_LOSSES, "Value losses": VALUE_LOSSES,
            "Online preference terms": ONLINE_PREFERENCE_TERMS}


def groups(reg: Registry) -> list[list[str]]:
    """The registered names, grouped by the object they name (sorted by the first name)."""
    by_object: dict[int, list[str]] = {}
    for name in reg.names():
        by_object.setdefault(id(reg.get(name)), []).append(name)
    return sorted(by_object.values())


def kind_cell(reg: Registry, name: str) -> str:
    if reg is PREFERENCE_LOSSES:
        return loss_spec(name).kind
    if reg is REWARD_MODEL_LOSSES:
        return reg.get(name).data_format
    if reg is ONLINE_PREFERENCE_TERMS:
        return reg.get(name).kind
    return {POLICY_LOSSES: "per token", LOSS_AGGREGATIONS: "aggregation",
            VALUE_LOSSES: "per token", ROLLOUT_CORRECTIONS: "importance weight"}[reg]


def inputs_cell(reg: Registry, name: str) -> str:
    """The tensors a loss reads: the declared fields of a preference loss, the Tensor arguments
    of the others (optional ones: those defaulting to None)."""
    if reg is PREFERENCE_LOSSES:
        spec = loss_spec(name)
        required, optional = list(spec.requires), list(spec.optional)
    else:
        params = inspect.signature(reg.get(name)).parameters.values()
        tensors = [p for p in params if "Tensor" in str(p.annotation)]
        required = [p.name for p in tensors if p.default is inspect.Parameter.empty]
        optional = [p.name for p in tensors if p.default is None]
    cell = ", ".join(required)
    return cell + (f"; optional: {', '.join(optional)}" if optional else "")


def doc_rows() -> dict[str, list[list[str]]]:
    """Section title → table rows (cells), from ``docs/losses.md``."""
    rows: dict[str, list[list[str]]] = {}
    section = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            rows[section] = []
        elif section and line.startswith("| `"):
            rows[section].append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


@pytest.mark.parametrize("title", SECTIONS)
def test_every_registered_loss_has_one_row_with_its_kind_and_inputs(title):
    reg, rows = SECTIONS[title], doc_rows().get(title)
    assert rows is not None, f"docs/losses.md has no '## {title}' section"
    documented = {frozenset(re.findall(r"`([^`]+)`", row[0])): row for row in rows}
    expected = {frozenset(names) for names in groups(reg)}
    missing = sorted(map(sorted, expected - set(documented)))
    stale = sorted(map(sorted, set(documented) - expected))
    assert not missing and not stale, (f"docs/losses.md, {title}: add rows for {missing}, "
                                       f"remove or fix rows {stale}")
    for names, (_, kind, paper, inputs) in documented.items():
        name = min(names)
        assert kind == kind_cell(reg, name), (f"docs/losses.md, {name}: kind should be "
                                              f"{kind_cell(reg, name)}")
        assert inputs == inputs_cell(reg, name), (f"docs/losses.md, {name}: inputs should be "
                                                  f"{inputs_cell(reg, name)}")
        assert paper, f"docs/losses.md, {name}: name the paper"
