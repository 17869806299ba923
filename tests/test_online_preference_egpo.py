"""EGPO: the objective is ``online_ipo`` on the pairs' slots; an iteration is an extragradient
step — extrapolate from θ_t, judge π_{t+1/2}'s samples, step again from θ_t; the algorithm learns,
resumes exactly after a kill, and rejects configs naming the field."""

from __future__ import annotations

import copy

import pytest
import torch

from alignlab.algorithms.online_preference import egpo
from alignlab.algorithms.online_preference.egpo import (
    EGPOConfig,
    EGPOObjective,
    train_egpo,
)
from alignlab.algorithms.online_preference.judge_config import JudgeSection
from alignlab.core.config import load_config
from alignlab.core.errors import ConfigError
from alignlab.data.preference_batches import collate_groups
from alignlab.engine.learner import Learner
from alignlab.losses.online_preference import online_ipo
from alignlab.models.loading import load_model
from alignlab.models.logprobs import completion_logprobs

from tests.conftest import random_llama
from tests.online_preference_helpers import (
    base_gold,
    config,
    eval_gold,
    metrics_rows,
    resumes_exactly,
)


def test_egpo_objective_reads_y1_and_y2_from_the_pairs_slots():
    model = random_llama()
    examples = [{"prompt_ids": [3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [9]},
                {"prompt_ids": [8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13]}]
    batch = collate_groups(examples, 0, layout="flat")
    with torch.no_grad():
        flat = completion_logprobs(model, batch)
    logps = torch.stack([flat[:2], flat[2:]], dim=1)
    ref = logps + torch.tensor([[0.1, -0.3], [0.0, 0.25]])
    win_margin = torch.tensor([0.5, -0.25])
    batch.update(ref_logps=ref, win_margin=win_margin)
    out = EGPOObjective(kl_coef=0.5).loss(model, batch)
    expected = online_ipo(logps, ref, win_margin, kl_coef=0.5).sum()
    assert out.loss_sum.item() == pytest.approx(expected.item(), abs=1e-5)
    # log-ratio margins −0.4 and 0.25, on the winner's side: −0.4·(+1), 0.25·(−1)
    assert out.metrics["log_ratio_margin"] == pytest.approx((-0.4 - 0.25) / 2, abs=1e-5)


def test_an_iteration_steps_from_theta_t_with_the_extrapolated_policys_pairs(
        tiny_world, world_cache, tmp_path, monkeypatch):
    """θ_1 = θ_0 − step(∇L(θ_0; π_{1/2}'s pairs)): the update starts from the snapshot (not from
    θ_{1/2}), on the pairs π_{1/2} sampled — what a fresh learner at θ_0 does with them."""
    calls = []
    real = Learner.update

    def recording(self, units):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        out = real(self, units)
        calls.append((units, before, {k: v.clone() for k, v in self.model.state_dict().items()}))
        return out

    monkeypatch.setattr(Learner, "update", recording)
    cfg = config("egpo", world_cache, tmp_path, steps=1, prompts=4, n=2, max_new_tokens=12,
                 lr=1e-3, kl_coef=0.5, win_rate_every=0)
    run = train_egpo(copy.deepcopy(cfg))
    assert len(calls) == 2
    (half_units, theta_0, theta_half), (update_units, start_of_update, _) = calls
    for key, value in theta_0.items():
        torch.testing.assert_close(start_of_update[key], value)  # restored to θ_0
    assert any(not torch.equal(theta_half[k], v) for k, v in theta_0.items())
    monkeypatch.setattr(Learner, "update", real)

    fresh = load_model(str(tiny_world.base_dir))
    Learner(fresh, EGPOObjective(0.5), cfg.train, seed=0).update(update_units)
    for key, value in run.model.state_dict().items():
        torch.testing.assert_close(value, fresh.state_dict()[key], atol=1e-5, rtol=1e-4, msg=key)
    # the extrapolation step's own pairs would have led elsewhere
    other = load_model(str(tiny_world.base_dir))
    Learner(other, EGPOObjective(0.5), cfg.train, seed=0).update(half_units)
    assert any(not torch.allclose(v, other.state_dict()[k], atol=1e-5)
               for k, v in run.model.state_dict().items())
    row = metrics_rows(tmp_path)[0]
    assert row["extrapolation/optimizer_steps"] == 1 and row["optimizer_steps"] == 1
    assert row["pairs"] == half_units.n and row["extrapolated_pairs"] == update_units.n


# Seed 0, 8 iterations of 8 prompts x 4 samples (2 pairs per prompt, one label each, twice an
# iteration), the gold judge's hard labels, τ = 0.05, lr 5e-4: eval gold 0.042 (base) -> 0.34
# (KL to the start 3.6 nats). One optimizer step an iteration, so it learns slowest of the
# family: τ = 0.1 reached 0.30, τ = 0.2 0.24, and lr 1e-3 (τ = 0.2) fell back to 0.09.
def test_egpo_with_the_gold_judge_raises_gold_sentiment(tiny_world, world_cache, tmp_path):
    before = base_gold(tiny_world)
    run = train_egpo(config("egpo", world_cache, tmp_path, steps=8, lr=5e-4, kl_coef=0.05,
                            preference="label", win_rate_every=4))
    after = eval_gold(run, tiny_world)
    assert after > before + 0.2, (before, after)
    rows = metrics_rows(tmp_path)
    for row in rows:
        # π_t's 16 pairs and π_{t+1/2}'s 16, one label each; a tie is trained on as Δ = 0
        assert row["labels"] + row["dropped_identical"] == 32
        assert row["pairs"] + row["extrapolated_pairs"] == row["labels"]
        assert row["optimizer_steps"] == row["extrapolation/optimizer_steps"] == 1
        assert -1 <= row["extrapolated_gold_mean"] <= 1
    assert rows[0]["kl_ref"] == pytest.approx(0.0, abs=1e-3)
    assert rows[0]["log_ratio_margin"] == pytest.approx(0.0, abs=1e-4)  # the update is at θ_0
    assert rows[0]["extrapolation/log_ratio_margin"] == pytest.approx(0.0, abs=1e-4)


def test_egpo_round_robin_resumes_exactly_after_a_kill(world_cache, tmp_path, monkeypatch):
    def make(out, steps):
        return config("egpo", world_cache, out, steps=steps, prompts=4, n=4, max_new_tokens=12,
                      estimate="round_robin", kl_coef=0.5, preference="label", win_rate_every=2,
                      judge=JudgeSection(kind="annotator", temperature=0.05, flip_rate=0.25))

    resumes_exactly("egpo", egpo.EGPO, make, tmp_path, monkeypatch)
    for row in metrics_rows(tmp_path / "a"):
        assert row["labels"] + row["dropped_identical"] == 2 * 4 * 6  # all pairs, twice


@pytest.mark.parametrize("override,field", [
    ("egpo.kl_coef=0", "egpo.kl_coef"),
    ("egpo.estimate=mean", "egpo.estimate"),
    ("egpo.win_rate_every=-1", "egpo.win_rate_every"),
])
def test_bad_values_are_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(EGPOConfig, overrides=[override])


def test_one_completion_per_prompt_is_refused(world_cache, tmp_path):
    with pytest.raises(ConfigError, match="rollout.n"):
        train_egpo(config("egpo", world_cache, tmp_path, steps=1, n=1))
