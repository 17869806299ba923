"""DNO: the objective is ``dno_regression`` on the pairs' slots, each variant builds its pairs and
labels from the win rates as the paper says, the algorithm learns, resumes exactly after a kill,
and rejects configs naming the field."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from alignlab.algorithms.online_preference import dno
from alignlab.algorithms.online_preference.dno import DNOConfig, DNOObjective, DNOSection, train_dno
from alignlab.algorithms.online_preference.judge_config import JudgeSection
from alignlab.core.config import load_config
from alignlab.core.errors import ConfigError
from alignlab.data.preference_batches import collate_groups
from alignlab.losses.online_preference import dno_regression
from alignlab.models.logprobs import completion_logprobs

from tests.conftest import random_llama
from tests.online_preference_helpers import (
    base_gold,
    config,
    eval_gold,
    metrics_rows,
    resumes_exactly,
)


def test_dno_objective_reads_y1_and_y2_from_the_pairs_slots():
    model = random_llama()
    examples = [{"prompt_ids": [3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [9]},
                {"prompt_ids": [8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13]}]
    batch = collate_groups(examples, 0, layout="flat")
    with torch.no_grad():
        flat = completion_logprobs(model, batch)
    logps = torch.stack([flat[:2], flat[2:]], dim=1)
    old = logps + torch.tensor([[0.1, -0.3], [0.0, 0.25]])
    label = torch.tensor([1.0, 0.3])
    batch.update(old_logps=old, label=label)
    out = DNOObjective(eta=0.5).loss(model, batch)
    expected = dno_regression(logps, old, label, eta=0.5).sum()
    assert out.loss_sum.item() == pytest.approx(expected.item(), abs=1e-5)
    # η·m towards the label's side: 0.5·(−0.4)·1 and 0.5·(0.25)·(−0.4)
    assert out.metrics["reward_margin"] == pytest.approx((-0.2 - 0.05) / 2, abs=1e-5)


def _rollouts(groups: list[int]) -> SimpleNamespace:
    return SimpleNamespace(prompt_index=[g for g, k in enumerate(groups) for _ in range(k)])


@pytest.mark.parametrize("margin,expected", [
    (0.25, [(2, 0)]),              # prompt 0's gap 0.5 passes, prompt 1's 0.2 does not
    (0.1, [(2, 0), (4, 5)]),
    (0.6, []),
])
def test_prct_pairs_best_against_worst_above_the_margin(margin, expected):
    algo = SimpleNamespace(section=DNOSection(variant="prct", margin=margin))
    win = [0.25, 0.5, 0.75, 0.5, 0.6, 0.4]
    pairs, labels = dno.DNO.pairs(algo, _rollouts([3, 3]), win)
    assert pairs == expected and labels == [1.0] * len(expected)


def test_regression_pairs_every_two_samples_with_the_soft_label():
    """DNO's Algorithm 1: label σ(r_t(y₁) − r_t(y₂)) on every pair of a prompt's samples."""
    algo = SimpleNamespace(section=DNOSection(variant="regression"))
    win = [0.25, 0.5, 0.75, 0.5, 0.6]
    pairs, labels = dno.DNO.pairs(algo, _rollouts([3, 2]), win)
    assert pairs == [(0, 1), (0, 2), (1, 2), (3, 4)]
    sigma = [1 / (1 + math.exp(-d)) for d in (-0.25, -0.5, -0.25, -0.1)]
    assert labels == pytest.approx(sigma)


# Seed 0, 8 iterations of 8 prompts x 4 samples (6 labels per prompt), DNO-Prct with margin
# 0.1 (6-8 pairs an iteration), η = 0.2, 3 epochs, lr 1e-3, gold judge: eval gold 0.042 (base)
# -> 0.42 (KL to the start 70 nats).
def test_dno_with_the_gold_judge_raises_gold_sentiment(tiny_world, world_cache, tmp_path):
    before = base_gold(tiny_world)
    run = train_dno(config("dno", world_cache, tmp_path, steps=8, lr=1e-3, eta=0.2, margin=0.1,
                           epochs=3, win_rate_every=4))
    after = eval_gold(run, tiny_world)
    assert after > before + 0.2, (before, after)
    rows = metrics_rows(tmp_path)
    for row in rows:
        assert row["labels"] + row["dropped_identical"] == 8 * 6  # every pair of 4 samples
        assert row["pairs"] + row["prompts_below_margin"] == 8
        if row["pairs"]:
            assert row["win_rate_gap"] > 0.1 and row["optimizer_steps"] == 3
    assert rows[0]["kl_ref"] == pytest.approx(0.0, abs=1e-3)


def test_dno_regression_resumes_exactly_after_a_kill(world_cache, tmp_path, monkeypatch):
    def make(out, steps):
        return config("dno", world_cache, out, steps=steps, prompts=4, n=3, max_new_tokens=12,
                      variant="regression", eta=0.5, epochs=2, minibatch_size=4,
                      preference="label", win_rate_every=2,
                      judge=JudgeSection(kind="annotator", temperature=0.05, flip_rate=0.25))

    resumes_exactly("dno", dno.DNO, make, tmp_path, monkeypatch)
    for row in metrics_rows(tmp_path / "a"):
        assert row["pairs"] == 4 * 3 and "prompts_below_margin" not in row  # every pair of 3
        assert row["optimizer_steps"] == 2 * 3  # 2 epochs of 12 pairs / 4


@pytest.mark.parametrize("override,field", [
    ("dno.variant=soft", "dno.variant"),
    ("dno.eta=0", "dno.eta"),
    ("dno.margin=1", "dno.margin"),
    ("dno.margin=-0.1", "dno.margin"),
    ("dno.epochs=0", "dno.epochs"),
])
def test_bad_values_are_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(DNOConfig, overrides=[override])


def test_one_completion_per_prompt_is_refused(world_cache, tmp_path):
    with pytest.raises(ConfigError, match="rollout.n"):
        train_dno(config("dno", world_cache, tmp_path, steps=1, n=1))
