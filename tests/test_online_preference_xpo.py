"""XPO: it learns, its objective is the paired loss plus α·log π(ỹ) on the reference samples,
it resumes exactly after a kill, and it rejects configs naming the field."""

from __future__ import annotations

import pytest
import torch

from alignlab.algorithms.online_preference import xpo
from alignlab.algorithms.online_preference.common import plan_paired_loss
from alignlab.algorithms.online_preference.judge_config import JudgeSection
from alignlab.algorithms.online_preference.xpo import XPOConfig, XPOObjective, XPOSection, train_xpo
from alignlab.algorithms.preference.trainer import PreferenceObjective
from alignlab.core.config import load_config
from alignlab.core.errors import ConfigError
from alignlab.data.preference_batches import collate_groups
from alignlab.models.logprobs import completion_logprobs

from tests.conftest import random_llama
from tests.online_preference_helpers import (
    base_gold,
    config,
    eval_gold,
    metrics_rows,
    resumes_exactly,
)


# Seed 0, 8 iterations of 8 prompts x 4 policy samples (each against one reference sample),
# lr 1e-3, gold judge: eval gold 0.042 (base) -> 0.49; the last iteration's gold win rate
# against the reference samples 0.70. About 4 s on 2 idle cores (fp32).
def test_xpo_with_the_gold_judge_raises_gold_sentiment(tiny_world, world_cache, tmp_path):
    before = base_gold(tiny_world)
    run = train_xpo(config("xpo", world_cache, tmp_path, steps=8, beta=0.1))
    after = eval_gold(run, tiny_world)
    assert after > before + 0.2, (before, after)
    rows = metrics_rows(tmp_path)
    for row in rows:
        # 8 prompts x 4 (policy, reference) pairs: trained, a tie or identical
        assert row["pairs"] + row["ties"] + row["dropped_identical"] == 32
        # the judge's win rate is read off the training verdicts (ties and identical pairs ½)
        assert row["win_rate_judge"] == pytest.approx(
            (row["policy_chosen_rate"] * row["pairs"]
             + 0.5 * (row["ties"] + row["dropped_identical"])) / 32)
        assert "win_rate/labels_total" not in row  # no extra labels for the win rate
    assert rows[-1]["labels_total"] == sum(r["pairs"] + r["ties"] for r in rows)
    assert rows[0]["kl_ref"] == pytest.approx(0.0, abs=1e-3)


def _pair_batch(explore_slot: list[int]):
    g = torch.Generator().manual_seed(0)
    examples = [{"prompt_ids": torch.randint(1, 60, (3,), generator=g).tolist(),
                 "chosen_ids": torch.randint(1, 60, (4,), generator=g).tolist(),
                 "rejected_ids": torch.randint(1, 60, (2,), generator=g).tolist(),
                 "ref_logps": [-9.0, -7.0]} for _ in explore_slot]
    batch = collate_groups(examples, 0, layout="flat")
    batch["explore_slot"] = torch.tensor(explore_slot)
    return batch


def test_xpo_objective_is_the_paired_loss_plus_alpha_log_pi_of_the_reference_samples():
    model = random_llama()
    plan = plan_paired_loss(XPOSection(beta=0.1), "xpo")
    batch = _pair_batch([0, 1])  # pair 0: the reference sample was chosen; pair 1: rejected
    dpo = PreferenceObjective(plan).loss(model, batch).loss_sum
    out = XPOObjective(plan, alpha=0.5).loss(model, batch)
    logps = completion_logprobs(model, batch)  # [chosen 0, chosen 1, rejected 0, rejected 1]
    expected = dpo + 0.5 * (logps[0] + logps[3])
    torch.testing.assert_close(out.loss_sum, expected)
    assert out.metrics["logps/reference_samples"] == pytest.approx(
        float((logps[0] + logps[3]).detach() / 2), abs=1e-5)


def test_xpo_objective_pushes_the_reference_samples_down():
    """Sign: with α > 0 the gradient step lowers log π(ỹ) more than DPO alone does."""
    batch = _pair_batch([1, 1])
    plan = plan_paired_loss(XPOSection(beta=0.1), "xpo")
    changes = []
    for alpha in (0.0, 5.0):
        model = random_llama()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        before = completion_logprobs(model, batch)[2:].sum().item()
        XPOObjective(plan, alpha=alpha).loss(model, batch).loss_sum.backward()
        opt.step()
        changes.append(completion_logprobs(model, batch)[2:].sum().item() - before)
    assert changes[1] < changes[0]


def test_xpo_resumes_exactly_after_a_kill(world_cache, tmp_path, monkeypatch):
    def make(out, steps):
        return config("xpo", world_cache, out, steps=steps, prompts=4, n=2, max_new_tokens=12,
                      alpha=0.1, judge=JudgeSection(kind="annotator", temperature=0.05,
                                                    flip_rate=0.25))

    resumes_exactly("xpo", xpo.XPO, make, tmp_path, monkeypatch)


@pytest.mark.parametrize("override,field", [
    ("xpo.alpha=-1", "xpo.alpha"),
    ("xpo.win_rate_every=-1", "xpo.win_rate_every"),
    ("xpo.preference=coin", "xpo.preference"),
])
def test_bad_values_are_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(XPOConfig, overrides=[override])


@pytest.mark.parametrize("change,field", [
    ({"loss": "kto"}, "xpo.loss"),
    ({"reference": "some/model"}, "xpo.reference"),
])
def test_losses_it_cannot_train_are_refused_naming_the_field(world_cache, tmp_path, change,
                                                             field):
    with pytest.raises(ConfigError, match=field):
        train_xpo(config("xpo", world_cache, tmp_path, steps=1, **change))
