"""Online DPO on the online controller: it learns, resumes exactly after a kill, and rejects
configs it cannot run, naming the field."""

from __future__ import annotations

import json

import pytest
import torch

from alignlab.algorithms.online_preference import online_dpo
from alignlab.algorithms.online_preference.online_dpo import (
    JudgeSection,
    OnlineDPOConfig,
    OnlineDPOSection,
    train_online_dpo,
)
from alignlab.core.config import (
    EvalSection,
    OnlineTrainSection,
    RolloutSection,
    WorldSection,
    load_config,
)
from alignlab.core.errors import ConfigError
from alignlab.eval.evaluate import evaluate
from alignlab.models.loading import load_model, load_tokenizer

EVAL = EvalSection(task="positive", n_prompts=32, samples_per_prompt=2, seed=11)


def _cfg(world_cache, out, *, steps, prompts=8, n=4, max_new_tokens=None, **section):
    return OnlineDPOConfig(
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        train=OnlineTrainSection(output_dir=str(out), max_steps=steps, lr=1e-3, batch_size=32,
                                 progress=False, tensorboard=False),
        rollout=RolloutSection(prompts="world:positive", prompts_per_step=prompts, n=n,
                               max_new_tokens=max_new_tokens),
        online_dpo=OnlineDPOSection(beta=0.1, **section))


# Seed 0, 8 iterations of 8 prompts x 4 samples, lr 1e-3, gold judge: the eval samples' gold
# went from the base model's to 0.45 (logged training gold −0.03 → 0.38).
def test_online_dpo_with_the_gold_judge_raises_gold_sentiment(tiny_world, world_cache, tmp_path):
    base = load_model(str(tiny_world.base_dir))
    tok = load_tokenizer(str(tiny_world.base_dir))
    before = evaluate(base, tok, tiny_world.task("positive"), EVAL)["metrics"]["gold_mean"]
    run = train_online_dpo(_cfg(world_cache, tmp_path, steps=8, win_rate_every=4))
    after = evaluate(run.model, run.tokenizer, tiny_world.task("positive"), EVAL)["metrics"]["gold_mean"]
    assert after > before + 0.2, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    labels = 0
    for row in rows:
        # 8 prompts x 4 samples = 16 pairs, each judged once: trained, a tie or identical
        assert row["pairs"] + row["ties"] + row["dropped_identical"] == 16
        labels += row["pairs"] + row["ties"]
        assert row["labels_total"] == labels
        # the gold judge picks the higher reward, so it believes in its own choice
        assert row["judge_p_chosen_mean"] >= 0.5
        assert row["optimizer_steps"] == 1
        assert 0 <= row["rewards/accuracies"] <= 1
        assert ("win_rate_gold" in row) == (row["step"] in (1, 5)) and "kl_ref" in row
    assert rows[-1]["gold_mean"] > rows[0]["gold_mean"]
    assert rows[4]["win_rate_gold"] > 0.5 and rows[-1]["kl_ref"] > rows[0]["kl_ref"]
    assert (tmp_path / "final" / "alignlab_config.yaml").exists()


def test_online_dpo_with_an_annotator_resumes_exactly_after_a_kill(world_cache, tmp_path,
                                                                    monkeypatch):
    def cfg(out, steps):
        c = _cfg(world_cache, out, steps=steps, prompts=4, n=2, max_new_tokens=12,
                 judge=JudgeSection(kind="annotator", temperature=0.05, flip_rate=0.25))
        c.train.save_every = 1
        return c

    full = train_online_dpo(cfg(tmp_path / "a", 3))
    real, calls = online_dpo.OnlineDPO.make_batches, []

    def killed_in_iteration_3(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill after the step-2 checkpoint, mid-iteration 3
        return real(self, *args)

    monkeypatch.setattr(online_dpo.OnlineDPO, "make_batches", killed_in_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        train_online_dpo(cfg(tmp_path / "b", 3))
    monkeypatch.setattr(online_dpo.OnlineDPO, "make_batches", real)
    resumed_cfg = cfg(tmp_path / "b", 3)
    resumed_cfg.train.resume = True
    resumed = train_online_dpo(resumed_cfg)
    assert resumed.result.history[0]["step"] == 3
    assert resumed.result.history[0]["labels_total"] == full.result.history[-1]["labels_total"]
    # the labelling budget's counters are checkpointed too
    assert resumed.result.history[0]["labels_used"] == full.result.history[-1]["labels_used"] > 0
    for key in ("win_rate_gold", "win_rate_judge", "kl_ref", "win_rate/labels_total"):
        assert resumed.result.history[-1][key] == pytest.approx(full.result.history[-1][key],
                                                                abs=1e-5), key
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


# Seed 0, 32 prompts × 4 samples, gold judge. Iteration 1 samples before any update, so the
# policy *is* the starting model: kl_ref = 0 up to float error (measured 0.000000, as logged)
# and its win rate against the starting model's own samples on the same prompts is ½ up to
# sampling noise (measured 0.52; 128 pairs, so ±0.15 is more than 3 standard errors). After two
# updates at lr 1e-3: kl_ref 5.2, win_rate_gold 0.59. About 8 s on 2 cores.
def test_online_dpo_logs_win_rates_and_kl_to_the_starting_model(world_cache, tmp_path):
    run = train_online_dpo(_cfg(world_cache, tmp_path, steps=3, prompts=32, n=4,
                                max_new_tokens=16, win_rate_every=2))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-4)
    assert abs(first["win_rate_gold"] - 0.5) <= 0.15
    # the gold judge picks the higher gold and calls equal gold a tie, as win_rate_gold counts
    assert first["win_rate_judge"] == first["win_rate_gold"]
    # one comparison per policy sample, judged by the win-rate judge (not training labels)
    assert first["win_rate/labels"] + first["win_rate/dropped_identical"] == 32 * 4
    assert first["labels_total"] == first["pairs"] + first["ties"]
    assert [("win_rate_gold" in r) for r in rows] == [True, False, True]  # every 2 iterations
    assert last["kl_ref"] > 0.01 and last["win_rate/labels_total"] == (
        first["win_rate/labels"] + last["win_rate/labels"])
    assert run.result.history[-1]["kl_ref"] == last["kl_ref"]


@pytest.mark.parametrize("change,field", [
    ({"loss": "kto"}, "online_dpo.loss"),
    ({"reference": "some/model"}, "online_dpo.reference"),
])
def test_config_errors_name_the_field(world_cache, tmp_path, change, field):
    with pytest.raises(ConfigError, match=field):
        train_online_dpo(_cfg(world_cache, tmp_path, steps=1, **change))


def test_a_negative_win_rate_schedule_is_refused():
    with pytest.raises(ConfigError, match=r"field 'online_dpo.win_rate_every'"):
        load_config(OnlineDPOConfig, overrides=["online_dpo.win_rate_every=-1"])


def test_one_completion_per_prompt_is_refused(world_cache, tmp_path):
    with pytest.raises(ConfigError, match="rollout.n"):
        train_online_dpo(_cfg(world_cache, tmp_path, steps=1, n=1))


def test_bf16_runs_sample_in_bf16_so_the_kl_to_the_start_begins_at_zero(world_cache, tmp_path):
    """Under ``train.precision: bf16`` the policy samples under bf16 autocast, as the starting
    model's log-probs are scored: the first iteration's ``kl_ref`` (before any update) is zero up
    to bf16 kernels' rounding (measured 0.0004 here, 0.0035 and 0.0026 at seeds 1 and 2; fp32:
    0). With the sampler in fp32 and the scorer in bf16 it was 0.0077 (a bias of the precision,
    not of the policy)."""
    cfg = _cfg(world_cache, tmp_path, steps=1, prompts=32, n=4, max_new_tokens=16)
    cfg.train = cfg.train.model_copy(update={"precision": "bf16"})
    train_online_dpo(cfg)
    [row] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["kl_ref"] == pytest.approx(0.0, abs=0.005)
