"""VPO: the objective is the paired loss plus sign·α·β·log π(y)/π_ref(y) on calibration samples
(the starting model's online, the data's own pairs offline), online it learns, offline it trains
on the fixed data without labels, it resumes exactly after a kill, and it rejects configs naming
the field."""

from __future__ import annotations

import pytest
import torch

from alignlab.algorithms.online_preference import vpo
from alignlab.algorithms.online_preference.common import Scorer, plan_paired_loss
from alignlab.algorithms.online_preference.judge_config import JudgeSection
from alignlab.algorithms.online_preference.value_term import (
    ValueTermObjective,
    pairs_with_calibration,
)
from alignlab.algorithms.online_preference.vpo import SIGN, VPOConfig, VPOSection, train_vpo
from alignlab.algorithms.preference.trainer import PreferenceObjective
from alignlab.core.config import load_config
from alignlab.core.errors import ConfigError
from alignlab.data.preference_batches import collate_groups
from alignlab.losses.online_preference import vpo_value
from alignlab.models.logprobs import completion_logprobs

from tests.conftest import random_llama
from tests.online_preference_helpers import (
    base_gold,
    config,
    eval_gold,
    metrics_rows,
    resumes_exactly,
)

BETA = 0.1


def _pairs():
    g = torch.Generator().manual_seed(0)
    return [{"prompt_ids": torch.randint(1, 60, (3,), generator=g).tolist(),
             "chosen_ids": torch.randint(1, 60, (4,), generator=g).tolist(),
             "rejected_ids": torch.randint(1, 60, (2,), generator=g).tolist(),
             "ref_logps": [-9.0, -7.0 - i]} for i in range(2)]


def _calibration(pairs):
    """Two π_cal samples per pair, on the pair's prompt."""
    g = torch.Generator().manual_seed(1)
    return [[{"prompt_ids": p["prompt_ids"],
              "completion_ids": torch.randint(1, 60, (3 + k,), generator=g).tolist(),
              "ref_logps": [-6.0 - k]} for k in range(2)] for p in pairs]


def _objective(mode: str, alpha: float) -> ValueTermObjective:
    plan = plan_paired_loss(VPOSection(beta=BETA), "vpo")
    return ValueTermObjective(
        plan, lambda lp, ref: vpo_value(lp, ref, sign=SIGN[mode], alpha=alpha, beta=BETA),
        "vpo_value")


def _online_batch():
    pairs = _pairs()
    scorer = Scorer(0, "flat", 4, torch.device("cpu"), "fp32")
    return pairs_with_calibration(scorer, pairs, _calibration(pairs)).take(torch.arange(2))


def test_online_objective_is_dpo_plus_alpha_beta_times_each_pairs_mean_calibration_log_ratio():
    model = random_llama()
    batch = _online_batch()
    plan = plan_paired_loss(VPOSection(beta=BETA), "vpo")
    dpo = PreferenceObjective(plan).loss(model, batch).loss_sum
    out = _objective("online", alpha=0.5).loss(model, batch)
    cal = completion_logprobs(model, batch["calibration"])  # pair 0's two, then pair 1's
    ratio = cal - batch["calibration"]["ref_logps"]
    torch.testing.assert_close(batch["calibration"]["ref_logps"],
                               torch.tensor([-6.0, -7.0, -6.0, -7.0]))
    torch.testing.assert_close(out.loss_sum, dpo + 0.5 * BETA * ratio.sum() / 2)
    assert out.metrics["loss/vpo_value"] == pytest.approx(float(0.05 * ratio.detach().mean()), abs=1e-6)
    assert out.metrics["calibration/log_ratio"] == pytest.approx(float(ratio.detach().mean()), abs=1e-5)


def test_offline_objective_is_dpo_minus_alpha_beta_times_the_pairs_own_mean_log_ratio():
    model = random_llama()
    batch = collate_groups(_pairs(), 0, layout="flat")
    plan = plan_paired_loss(VPOSection(beta=BETA), "vpo")
    dpo = PreferenceObjective(plan).loss(model, batch).loss_sum
    out = _objective("offline", alpha=0.5).loss(model, batch)
    ratio = completion_logprobs(model, batch) - torch.tensor([-9.0, -9.0, -7.0, -8.0])
    torch.testing.assert_close(out.loss_sum, dpo - 0.5 * BETA * ratio.sum() / 2)


@pytest.mark.parametrize("mode,lower", [("online", True), ("offline", False)])
def test_the_value_term_lowers_calibration_samples_online_and_raises_them_offline(mode, lower):
    """Sign: compared with DPO alone (α = 0), a step with α > 0 moves the calibration samples'
    log-probs down online (optimism) and up offline (pessimism)."""
    batch = _online_batch() if mode == "online" else collate_groups(_pairs(), 0, layout="flat")
    cal = batch.get("calibration", batch)
    changes = []
    for alpha in (0.0, 5.0):
        model = random_llama()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        before = completion_logprobs(model, cal).sum().item()
        _objective(mode, alpha).loss(model, batch).loss_sum.backward()
        opt.step()
        changes.append(completion_logprobs(model, cal).sum().item() - before)
    assert (changes[1] < changes[0]) == lower, changes


# Seed 0, 8 iterations of 8 prompts x 4 samples (2 pairs per prompt, each with 2 samples of
# the starting model), α = 0.1, β = 0.1, 1 step per iteration, lr 1e-3, gold judge: eval gold
# 0.042 (base) -> 0.30; kl_ref 9.6 nats; the starting model's samples 5.8 nats less likely
# under the policy than under the start (calibration/log_ratio, the optimism's push).
def test_online_vpo_with_the_gold_judge_raises_gold_sentiment(tiny_world, world_cache, tmp_path):
    before = base_gold(tiny_world)
    run = train_vpo(config("vpo", world_cache, tmp_path, steps=8, beta=BETA, win_rate_every=4))
    after = eval_gold(run, tiny_world)
    assert after > before + 0.2, (before, after)
    rows = metrics_rows(tmp_path)
    for row in rows:
        assert row["pairs"] + row["ties"] + row["dropped_identical"] == 16
        assert row["optimizer_steps"] == 1
    assert rows[-1]["labels_total"] == sum(r["labels"] for r in rows)
    assert [("win_rate_gold" in r) for r in rows] == [i % 4 == 0 for i in range(8)]
    # online the term pushes the starting model's samples down: π_θ/π_ref < 1 on them
    assert rows[-1]["calibration/log_ratio"] < 0


def test_offline_vpo_trains_on_the_fixed_pairs_without_labels(world_cache, tmp_path):
    train_vpo(config("vpo", world_cache, tmp_path, steps=2, prompts=4, n=4, max_new_tokens=12,
                     mode="offline", offline_data="world:positive", offline_limit=32,
                     alpha=5.0))
    rows = metrics_rows(tmp_path)
    for row in rows:
        assert row["offline_pairs"] == 4 * 2  # prompts_per_step x ⌊n/2⌋
        assert row["labels_total"] == 0 and "pairs" not in row
        assert "kl_ref" in row and "win_rate_gold" in row  # the policy is still monitored
    # offline the term pulls the data's responses up: π_θ/π_ref > 1 on them after a step
    assert rows[-1]["calibration/log_ratio"] > 0


def test_vpo_resumes_exactly_after_a_kill(world_cache, tmp_path, monkeypatch):
    def make(out, steps):
        return config("vpo", world_cache, out, steps=steps, prompts=4, n=2, max_new_tokens=12,
                      alpha=0.5, epochs=2, minibatch_size=1, win_rate_every=2,
                      judge=JudgeSection(kind="annotator", temperature=0.05, flip_rate=0.25))

    resumes_exactly("vpo", vpo.VPO, make, tmp_path, monkeypatch)


@pytest.mark.parametrize("overrides,field", [
    (["vpo.alpha=-1"], "vpo.alpha"),
    (["vpo.mode=sideways"], "vpo.mode"),
    (["vpo.mode=offline"], "vpo.offline_data"),
    (["vpo.offline_data=world:positive"], "vpo.offline_data"),
    (["vpo.mode=offline", "vpo.offline_data=world:positive", "vpo.offline_limit=0"],
     "vpo.offline_limit"),
])
def test_bad_values_are_rejected_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(VPOConfig, overrides=overrides)


@pytest.mark.parametrize("change,field", [
    ({"loss": "kto"}, "vpo.loss"),
    ({"n": 1}, "rollout.n"),
])
def test_configs_it_cannot_train_are_refused_naming_the_field(world_cache, tmp_path, change,
                                                              field):
    with pytest.raises(ConfigError, match=field):
        train_vpo(config("vpo", world_cache, tmp_path, steps=1, **change))
