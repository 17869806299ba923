"""SPPO: the objective regresses the log-ratio to the sampling policy onto η·(P̂ − ½), the
algorithm learns, resumes exactly after a kill, and rejects configs naming the field."""

from __future__ import annotations

import pytest
import torch

from alignlab.algorithms.online_preference import sppo
from alignlab.algorithms.online_preference.judge_config import JudgeSection
from alignlab.algorithms.online_preference.sppo import SPPOConfig, SPPOObjective, train_sppo
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


def test_sppo_objective_is_the_squared_distance_to_the_target():
    model = random_llama()
    examples = [{"prompt_ids": [3, 4], "completion_ids": [5, 6, 7]},
                {"prompt_ids": [8], "completion_ids": [9, 10]}]
    batch = collate_groups(examples, 0, layout="flat")
    with torch.no_grad():
        old = completion_logprobs(model, batch) + torch.tensor([0.3, -0.2])
    batch.update(old_logps=old, win_prob=torch.tensor([0.75, 0.5]))
    out = SPPOObjective(eta=2.0).loss(model, batch)
    # log-ratios −0.3 and 0.2; targets 2·(0.75 − ½) = 0.5 and 0
    assert out.loss_sum.item() == pytest.approx((-0.3 - 0.5) ** 2 + 0.2 ** 2, abs=1e-5)


def test_one_sppo_step_raises_the_winner_and_lowers_the_loser():
    model = random_llama()
    examples = [{"prompt_ids": [3, 4], "completion_ids": [5, 6, 7]},
                {"prompt_ids": [3, 4], "completion_ids": [9, 10]}]
    batch = collate_groups(examples, 0, layout="flat")
    with torch.no_grad():
        before = completion_logprobs(model, batch)
    batch.update(old_logps=before.clone(), win_prob=torch.tensor([1.0, 0.0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    SPPOObjective(eta=1.0).loss(model, batch).loss_sum.backward()
    opt.step()
    with torch.no_grad():
        change = completion_logprobs(model, batch) - before
    assert change[0] > 0 > change[1]


# Seed 0, 8 iterations of 8 prompts x 4 samples (6 labels per prompt), η = 5, 2 epochs,
# lr 5e-4, gold judge: eval gold 0.042 (base) -> 0.50 (KL to the start 3.1 nats). About 4 s
# on 2 idle cores (fp32).
def test_sppo_with_the_gold_judge_raises_gold_sentiment(tiny_world, world_cache, tmp_path):
    before = base_gold(tiny_world)
    run = train_sppo(config("sppo", world_cache, tmp_path, steps=8, lr=5e-4, eta=5.0,
                            win_rate_every=4))
    after = eval_gold(run, tiny_world)
    assert after > before + 0.2, (before, after)
    rows = metrics_rows(tmp_path)
    for row in rows:
        assert row["samples"] == 32 and row["optimizer_steps"] == 2
        assert row["labels"] + row["dropped_identical"] == 8 * 6  # every pair of 4 samples


def test_sppo_resumes_exactly_after_a_kill(world_cache, tmp_path, monkeypatch):
    def make(out, steps):
        return config("sppo", world_cache, out, steps=steps, prompts=4, n=3, max_new_tokens=12,
                      epochs=2, minibatch_size=4, train_on="best_worst", preference="label",
                      win_rate_every=2, judge=JudgeSection(kind="annotator", temperature=0.05,
                                                           flip_rate=0.25))

    resumes_exactly("sppo", sppo.SPPO, make, tmp_path, monkeypatch)


@pytest.mark.parametrize("override,field", [
    ("sppo.eta=0", "sppo.eta"),
    ("sppo.train_on=top", "sppo.train_on"),
    ("sppo.epochs=0", "sppo.epochs"),
    ("sppo.minibatch_size=0", "sppo.minibatch_size"),
])
def test_bad_values_are_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(SPPOConfig, overrides=[override])


def test_one_completion_per_prompt_is_refused(world_cache, tmp_path):
    with pytest.raises(ConfigError, match="rollout.n"):
        train_sppo(config("sppo", world_cache, tmp_path, steps=1, n=1))
