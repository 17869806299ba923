"""P3O: the objective is the clipped pairwise surrogate on the pairs' two slots, the algorithm
learns, resumes exactly after a kill, and rejects configs naming the field."""

from __future__ import annotations

import pytest
import torch

from alignlab.algorithms.online_preference import p3o
from alignlab.algorithms.online_preference.judge_config import JudgeSection
from alignlab.algorithms.online_preference.p3o import P3OConfig, P3OObjective, train_p3o
from alignlab.core.config import load_config
from alignlab.core.errors import ConfigError
from alignlab.data.preference_batches import collate_groups
from alignlab.losses.online_preference import p3o_joint, p3o_separate
from alignlab.models.logprobs import completion_logprobs

from tests.conftest import random_llama
from tests.online_preference_helpers import (
    base_gold,
    config,
    eval_gold,
    metrics_rows,
    resumes_exactly,
)


@pytest.mark.parametrize("clipping,term", [("joint", p3o_joint), ("separate", p3o_separate)])
def test_p3o_objective_reads_y1_and_y2_from_the_pairs_slots(clipping, term):
    model = random_llama()
    examples = [{"prompt_ids": [3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [9]},
                {"prompt_ids": [8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13]}]
    batch = collate_groups(examples, 0, layout="flat")
    flat = completion_logprobs(model, batch)
    logps = torch.stack([flat[:2], flat[2:]], dim=1)  # [pair, (y₁, y₂)]
    old = logps.detach() + torch.tensor([[0.1, -0.3], [0.0, 0.25]])
    advantages = torch.tensor([0.8, -0.4])
    batch.update(old_logps=old, advantages=advantages)
    out = P3OObjective(clipping, 0.2).loss(model, batch)
    torch.testing.assert_close(out.loss_sum, term(logps, old, advantages, clip_eps=0.2).sum())


# Seed 0, 8 iterations of 8 prompts x 4 samples (2 pairs per prompt), joint clipping,
# β_KL = 0.05, 2 epochs, lr 1e-3, gold judge: eval gold 0.042 (base) -> 0.55 (KL to the start
# 20 nats). About 4 s on 2 idle cores (fp32).
def test_p3o_with_the_gold_judge_raises_gold_sentiment(tiny_world, world_cache, tmp_path):
    before = base_gold(tiny_world)
    run = train_p3o(config("p3o", world_cache, tmp_path, steps=8, win_rate_every=4))
    after = eval_gold(run, tiny_world)
    assert after > before + 0.2, (before, after)
    rows = metrics_rows(tmp_path)
    for row in rows:
        assert row["pairs"] + row["dropped_identical"] == 16
        assert row["optimizer_steps"] == 2


def test_p3o_resumes_exactly_after_a_kill(world_cache, tmp_path, monkeypatch):
    def make(out, steps):
        return config("p3o", world_cache, out, steps=steps, prompts=4, n=2, max_new_tokens=12,
                      clipping="separate", epochs=2, minibatch_size=2, win_rate_every=2,
                      judge=JudgeSection(kind="annotator", temperature=0.05, flip_rate=0.25))

    resumes_exactly("p3o", p3o.P3O, make, tmp_path, monkeypatch)


@pytest.mark.parametrize("override,field", [
    ("p3o.clipping=both", "p3o.clipping"),
    ("p3o.clip_eps=1.5", "p3o.clip_eps"),
    ("p3o.kl_coef=-1", "p3o.kl_coef"),
])
def test_bad_values_are_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(P3OConfig, overrides=[override])


def test_one_completion_per_prompt_and_off_policy_sampling_are_refused(world_cache, tmp_path):
    with pytest.raises(ConfigError, match="rollout.n"):
        train_p3o(config("p3o", world_cache, tmp_path, steps=1, n=1))
    cfg = config("p3o", world_cache, tmp_path, steps=1)
    cfg.rollout.temperature = 0.5
    with pytest.raises(ConfigError, match="rollout.temperature"):
        train_p3o(cfg)
