"""Reward-model scoring: aggregation, ensemble save/load, and the ``reward_model`` registry entry."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from alignlab.algorithms.reward_model.trainer import RewardConfig, RewardSection, run_reward
from alignlab.core.config import DataSection, TrainSection, WorldSection
from alignlab.core.errors import ConfigError
from alignlab.models.heads import CausalLMWithScalarHead
from alignlab.rewards.registry import REWARDS, get_reward
from alignlab.rewards.reward_model import (
    RewardEnsemble,
    aggregate_rewards,
    load_scorer,
    scored_completion,
)
from alignlab.world import language as lang

from tests.conftest import random_llama


def test_aggregation_values():
    r = torch.tensor([[1.0, 3.0], [2.0, 2.0], [-1.0, 5.0]])
    assert aggregate_rewards(r, "mean").tolist() == [2.0, 2.0, 2.0]
    assert aggregate_rewards(r, "min").tolist() == [1.0, 2.0, -1.0]
    # population std: 1, 0, 3
    assert aggregate_rewards(r, "mean_minus_std", std_coef=0.5).tolist() == [1.5, 2.0, 0.5]
    assert aggregate_rewards(torch.tensor([0.5]), "min").tolist() == [0.5]
    with pytest.raises(ConfigError, match="allowed values: mean, min, mean_minus_std"):
        aggregate_rewards(r, "max")


def _batch() -> dict:
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    return {"input_ids": ids, "attention_mask": attn, "position_ids": torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0]])}


def test_ensemble_round_trip_of_members_and_heads(tmp_path):
    members = [CausalLMWithScalarHead(random_llama(seed=s), num_heads=h) for s, h in ((0, 2), (1, 1))]
    ensemble = RewardEnsemble(members, "mean_minus_std", std_coef=2.0)
    batch = _batch()
    with torch.no_grad():
        before = ensemble.member_rewards(batch)
        agg = ensemble(batch)
    assert before.shape == (2, 3)
    expected = before.mean(-1) - 2.0 * before.std(-1, correction=0)
    assert torch.allclose(agg, expected)
    ensemble.save_pretrained(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "reward_model.json").read_text())["num_heads"] == [2, 1]
    loaded = RewardEnsemble.from_pretrained(tmp_path / "rm")
    assert loaded.size == 3 and loaded.aggregate == "mean_minus_std" and loaded.std_coef == 2.0
    with torch.no_grad():
        assert torch.allclose(loaded.member_rewards(batch), before, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert RewardEnsemble.from_pretrained(tmp_path / "rm", aggregate="min").aggregate == "min"
    shutil.rmtree(tmp_path / "rm" / "member_1")
    with pytest.raises(ConfigError, match="member_1 is missing"):
        RewardEnsemble.from_pretrained(tmp_path / "rm")


def test_sequence_classification_checkpoint_is_a_one_member_ensemble(tmp_path):
    from transformers import LlamaForSequenceClassification

    lm = random_llama()
    cfg = lm.config
    cfg.num_labels = 1
    classifier = LlamaForSequenceClassification(cfg).eval()
    classifier.save_pretrained(tmp_path / "seqcls")
    batch = _batch()
    with torch.no_grad():
        expected = classifier(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        loaded = RewardEnsemble.from_pretrained(tmp_path / "seqcls", aggregate="min")
        assert loaded.size == 1
        torch.testing.assert_close(loaded(batch), expected, atol=1e-5, rtol=1e-5)


def test_scored_completion_keeps_the_leading_space():
    assert scored_completion(" the soup was good .<|end|> junk") == " the soup was good ."
    assert scored_completion("good") == "good"
    assert scored_completion("<|end|>") == ""


def test_trained_reward_model_scores_positive_above_negative(tiny_world, world_cache, tmp_path):
    cfg = RewardConfig(
        data=DataSection(source="world:positive", limit=320),
        train=TrainSection(output_dir=str(tmp_path), max_steps=30, batch_size=16, lr=1e-3,
                           warmup_steps=3, progress=False, tensorboard=False),
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        reward=RewardSection(eval_fraction=0.0))
    run_reward(cfg)
    import alignlab.rewards.reward_model  # noqa: F401  (registers "reward_model")

    assert "reward_model" in REWARDS
    rng = random.Random(5)
    task = tiny_world.task("positive")
    prefixes = {p.text: p for p in lang.all_review_prefixes()}
    prompts = task.eval_prompts[:24]  # prompts the reward model never saw
    positive = [lang.complete_review(rng, prefixes[p], p=1.0) + lang.END for p in prompts]
    negative = [lang.complete_review(rng, prefixes[p], p=0.0) + lang.END for p in prompts]
    reward = get_reward("reward_model", path=str(tmp_path / "final"))
    pos, neg = reward(prompts, positive), reward(prompts, negative)
    wins = sum(a > b for a, b in zip(pos, neg)) / len(prompts)
    assert wins >= 0.9, (pos, neg)  # measured 1.0
    scores = load_scorer(tmp_path / "final").score(prompts[:2], positive[:2])
    assert scores.rewards == pytest.approx(pos[:2], abs=1e-5)
    assert [len(m) for m in scores.members] == [1, 1]


def test_a_trained_ensemble_is_an_rl_reward_aggregated_as_configured(tiny_world, world_cache,
                                                                      tmp_path):
    from statistics import fmean, pstdev

    from alignlab.algorithms.policy_gradient.config import RLSection
    from alignlab.algorithms.policy_gradient.run import build_reward
    from alignlab.algorithms.reward_model.trainer import EnsembleSection

    cfg = RewardConfig(
        data=DataSection(source="world:positive", limit=64),
        train=TrainSection(output_dir=str(tmp_path), max_steps=2, batch_size=16, lr=1e-3,
                           progress=False, tensorboard=False),
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        reward=RewardSection(eval_fraction=0.0, ensemble=EnsembleSection(
            members=2, num_heads=2, aggregate="min")))
    run_reward(cfg)
    final = str(tmp_path / "final")
    prompts = tiny_world.task("positive").eval_prompts[:4]
    completions = [" the soup was great .", " terrible .", "", " fine ."]
    columns = load_scorer(final).score(prompts, completions).members
    assert [len(c) for c in columns] == [4] * 4  # 2 members x 2 heads
    expected = {"mean": [fmean(c) for c in columns], "min": [min(c) for c in columns],
                "mean_minus_std": [fmean(c) - 0.5 * pstdev(c) for c in columns]}
    for aggregate, want in expected.items():
        rl = RLSection(reward={"reward_model": 2.0}, reward_params={"reward_model": {
            "path": final, "aggregate": aggregate, "std_coef": 0.5}})
        got = build_reward(rl, None).score(prompts, completions)
        assert got.components["reward_model"] == pytest.approx(want, abs=1e-5), aggregate
        assert got.scores == pytest.approx([2 * w for w in want], abs=1e-5)
    assert len(set(map(tuple, expected.values()))) == 3  # the aggregates really differ
    # Without an aggregate the one saved by `alignlab train reward` (min) applies.
    rl = RLSection(reward="reward_model", reward_params={"reward_model": {"path": final}})
    assert build_reward(rl, None).score(prompts, completions).scores == pytest.approx(
        expected["min"], abs=1e-5)


def test_reward_model_params_are_checked_when_the_run_is_built(tmp_path):
    from alignlab.algorithms.policy_gradient.config import RLSection
    from alignlab.algorithms.policy_gradient.run import build_reward

    def build(**params):
        build_reward(RLSection(reward="reward_model", reward_params={"reward_model": params}), None)

    (tmp_path / "rm").mkdir()
    with pytest.raises(ConfigError, match="rl.reward_params.reward_model: 'path' is required"):
        build()
    with pytest.raises(ConfigError, match="rl.reward_params.reward_model: path .*/nope' is not a folder"):
        build(path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="aggregate 'max'; allowed values: mean, min, mean_minus_std"):
        build(path=str(tmp_path / "rm"), aggregate="max")
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) agregate; allowed: path, aggregate"):
        build(path=str(tmp_path / "rm"), agregate="min")


def test_a_reward_model_resaved_at_the_same_path_is_reloaded(tiny_world, tmp_path):
    """The scorer cache is keyed on the files' content, not their modification time: new
    weights copied over the old ones with the old mtimes kept (``cp -p``) are not stale."""
    import os

    from alignlab.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_world.base_dir)
    rm = tmp_path / "rm"

    def save(seed: int) -> None:
        model = random_llama(vocab_size=len(tok), seed=seed)
        RewardEnsemble([CausalLMWithScalarHead(model)]).save_pretrained(
            rm, pad_token_id=tok.pad_token_id)
        tok.save_pretrained(rm)

    save(0)
    times = {f: (f.stat().st_atime_ns, f.stat().st_mtime_ns) for f in rm.rglob("*") if f.is_file()}
    prompts, completions = ["the soup"], [" was good ."]
    first = load_scorer(rm).score(prompts, completions).rewards
    assert load_scorer(rm) is load_scorer(rm)  # unchanged files: the cached scorer
    save(1)
    for f, (atime, mtime) in times.items():
        os.utime(f, ns=(atime, mtime))
    second = load_scorer(rm).score(prompts, completions).rewards
    assert second != first
