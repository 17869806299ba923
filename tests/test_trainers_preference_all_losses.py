"""Every registered preference loss runs in the preference trainer's objective: the trainer
plans its inputs (per-token log-probs, several references, data columns), fills them from a
collated batch and back-propagates a finite loss into the policy."""

from __future__ import annotations

import pytest
import torch

from alignlab.algorithms.preference.trainer import (
    PreferenceObjective,
    PreferenceSection,
    plan_losses,
)
from alignlab.data.preference_batches import add_kl_completions, collate_groups
from alignlab.losses.preference import PREFERENCE_LOSSES, loss_spec

from tests.conftest import random_llama

DISTINCT = sorted({loss_spec(n).name for n in PREFERENCE_LOSSES.names()})


def _examples(kind: str) -> list[dict]:
    """Three rows of ``kind`` carrying every data column some loss reads."""
    g = torch.Generator().manual_seed(0)
    r = lambda k: torch.randint(1, 64, (k,), generator=g).tolist()  # noqa: E731
    if kind == "paired":
        return [{"prompt_ids": r(3 + i), "chosen_ids": r(4 + i), "rejected_ids": r(2 + 2 * i),
                 "margin": 1.0 + i, "tie": i == 1, "group_id": i % 2} for i in range(3)]
    if kind == "unpaired":
        ex = [{"prompt_ids": r(3 + i), "completion_ids": r(2 + i), "label": i != 1,
               "reward": 0.5 * i, "value": 0.25} for i in range(3)]
        add_kl_completions(ex, seed=0)
        return ex
    return [{"prompt_ids": r(3 + i), "completion_ids": [r(2 + i), r(3), r(4 - i)],
             "scores": [1.0, 0.5 * i, -1.0]} for i in range(3)]


@pytest.fixture(scope="module")
def models():
    return random_llama(seed=11).float(), random_llama(seed=12).float()


@pytest.mark.parametrize("name", DISTINCT)
def test_every_registered_loss_runs_in_the_trainer(models, name):
    policy, reference = models
    plan = plan_losses(PreferenceSection(loss=name))
    objective = PreferenceObjective(plan, reference if plan.needs_reference else None)
    batch = collate_groups(_examples(plan.kind), 0, layout="flat")
    policy.zero_grad()
    out = objective.loss(policy, batch)
    assert torch.isfinite(out.loss_sum), name
    out.loss_sum.backward()
    grad = policy.model.embed_tokens.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_ld_dpo_objective_reads_per_token_inputs_and_alpha_one_is_dpo(models):
    policy, reference = models
    batch = collate_groups(_examples("paired"), 0, layout="flat")

    def loss(name: str, **kwargs) -> float:
        section = PreferenceSection(loss=name, beta=0.5, loss_kwargs=kwargs)
        return PreferenceObjective(plan_losses(section), reference).loss(policy, batch).loss_sum.item()

    assert plan_losses(PreferenceSection(loss="ld_dpo")).needs.tokens
    assert loss("ld_dpo", alpha=1.0) == pytest.approx(loss("dpo"), abs=1e-5)
    assert loss("ld_dpo", alpha=0.3) != pytest.approx(loss("dpo"), abs=1e-3)  # the tails differ
