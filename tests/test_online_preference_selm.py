"""SELM: the objective is the paired loss plus α·β·log π(y)/π_ref(y) on the pairs' samples of
π_ref, the reference is the policy as each iteration starts, it learns, resumes exactly after a
kill, and rejects configs naming the field."""

from __future__ import annotations

import pytest
import torch

from alignlab.algorithms.online_preference import selm
from alignlab.algorithms.online_preference.common import plan_paired_loss
from alignlab.algorithms.online_preference.judge_config import JudgeSection
from alignlab.algorithms.online_preference.selm import SELMConfig, SELMSection, train_selm
from alignlab.algorithms.online_preference.value_term import ValueTermObjective
from alignlab.algorithms.preference.trainer import PreferenceObjective
from alignlab.core.config import load_config
from alignlab.core.errors import ConfigError
from alignlab.data.preference_batches import collate_groups
from alignlab.losses.online_preference import selm_optimism
from alignlab.models.logprobs import completion_logprobs

from tests.conftest import random_llama
from tests.online_preference_helpers import (
    base_gold,
    config,
    eval_gold,
    metrics_rows,
    resumes_exactly,
)


def _pair_batch():
    g = torch.Generator().manual_seed(0)
    examples = [{"prompt_ids": torch.randint(1, 60, (3,), generator=g).tolist(),
                 "chosen_ids": torch.randint(1, 60, (4,), generator=g).tolist(),
                 "rejected_ids": torch.randint(1, 60, (2,), generator=g).tolist(),
                 "ref_logps": [-9.0, -7.0 - i]} for i in range(2)]
    return collate_groups(examples, 0, layout="flat")


def _objective(alpha: float, beta: float = 0.1) -> ValueTermObjective:
    plan = plan_paired_loss(SELMSection(beta=beta), "selm")
    return ValueTermObjective(plan, lambda lp, ref: selm_optimism(lp, ref, alpha=alpha, beta=beta),
                              "selm_optimism")


def test_selm_objective_is_dpo_plus_alpha_beta_times_the_mean_log_ratio_of_each_pair():
    model = random_llama()
    batch = _pair_batch()
    plan = plan_paired_loss(SELMSection(beta=0.1), "selm")
    dpo = PreferenceObjective(plan).loss(model, batch).loss_sum
    out = _objective(alpha=0.5).loss(model, batch)
    logps = completion_logprobs(model, batch)  # [chosen 0, chosen 1, rejected 0, rejected 1]
    ratio = logps - torch.tensor([-9.0, -9.0, -7.0, -8.0])
    expected = dpo + 0.5 * 0.1 * (ratio[0] + ratio[2]) / 2 + 0.5 * 0.1 * (ratio[1] + ratio[3]) / 2
    torch.testing.assert_close(out.loss_sum, expected)
    assert out.metrics["loss/selm_optimism"] == pytest.approx(float(0.05 * ratio.detach().mean()), abs=1e-6)
    assert out.metrics["calibration/log_ratio"] == pytest.approx(float(ratio.detach().mean()), abs=1e-5)


def test_selm_objective_pushes_the_pairs_samples_down():
    """Sign: with α > 0 a gradient step lowers log π of both samples more than DPO alone."""
    batch = _pair_batch()
    changes = []
    for alpha in (0.0, 5.0):
        model = random_llama()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        before = completion_logprobs(model, batch).sum().item()
        _objective(alpha).loss(model, batch).loss_sum.backward()
        opt.step()
        changes.append(completion_logprobs(model, batch).sum().item() - before)
    assert changes[1] < changes[0]


# Seed 0, 8 iterations of 8 prompts x 4 samples (2 pairs per prompt), α = 0.001, β = 0.1,
# 2 epochs, lr 1e-3, gold judge: eval gold 0.042 (base) -> 0.40; gold win rate against the
# starting model's samples 0.41 (iteration 0) -> 0.58 (iteration 4); kl_ref 50 nats at the end
# (the reference moves with the policy, so nothing holds it near the start).
def test_selm_with_the_gold_judge_raises_gold_sentiment(tiny_world, world_cache, tmp_path):
    before = base_gold(tiny_world)
    run = train_selm(config("selm", world_cache, tmp_path, steps=8, beta=0.1, win_rate_every=4))
    after = eval_gold(run, tiny_world)
    assert after > before + 0.2, (before, after)
    rows = metrics_rows(tmp_path)
    for row in rows:
        assert row["pairs"] + row["ties"] + row["dropped_identical"] == 16  # 8 prompts x 2 pairs
        assert row["optimizer_steps"] == 2
    assert rows[-1]["labels_total"] == sum(r["labels"] for r in rows)
    assert rows[-1]["kl_ref"] > 0.5  # away from the starting model ...


def test_selm_reference_is_the_policy_as_each_iteration_starts(world_cache, tmp_path):
    """With one step per iteration the step is taken at θ = π_ref, so the log-ratio it sees is
    0 (the reference moved with the policy), while the policy drifts from the starting model."""
    train_selm(config("selm", world_cache, tmp_path, steps=3, prompts=4, n=2, max_new_tokens=12,
                      epochs=1, alpha=0.5))
    rows = metrics_rows(tmp_path)
    for row in rows:
        assert row["calibration/log_ratio"] == pytest.approx(0.0, abs=1e-4)
        assert row["loss/selm_optimism"] == pytest.approx(0.0, abs=1e-5)
    assert abs(rows[-1]["kl_ref"]) > 1e-2


def test_selm_resumes_exactly_after_a_kill(world_cache, tmp_path, monkeypatch):
    def make(out, steps):
        return config("selm", world_cache, out, steps=steps, prompts=4, n=2, max_new_tokens=12,
                      alpha=0.1, epochs=2, minibatch_size=1, preference="label",
                      win_rate_every=2, judge=JudgeSection(kind="annotator", temperature=0.05,
                                                           flip_rate=0.25))

    resumes_exactly("selm", selm.SELM, make, tmp_path, monkeypatch)


@pytest.mark.parametrize("override,field", [
    ("selm.alpha=-1", "selm.alpha"),
    ("selm.beta=0", "selm.beta"),
    ("selm.epochs=0", "selm.epochs"),
    ("selm.minibatch_size=0", "selm.minibatch_size"),
])
def test_bad_values_are_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(SELMConfig, overrides=[override])


@pytest.mark.parametrize("change,field", [
    ({"loss": "kto"}, "selm.loss"),
    ({"reference": "some/model"}, "selm.reference"),
    ({"n": 1}, "rollout.n"),
])
def test_configs_it_cannot_train_are_refused_naming_the_field(world_cache, tmp_path, change,
                                                              field):
    with pytest.raises(ConfigError, match=field):
        train_selm(config("selm", world_cache, tmp_path, steps=1, **change))
