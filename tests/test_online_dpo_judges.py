"""Online DPO's judge from config: the pool and the LLM judge, the labelling budget logged per
iteration, and config errors that name the field and the allowed values."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alignlab.algorithms.online_preference.judge_config import (
    JudgeSection,
    LLMJudgeSection,
    PoolAnnotatorSection,
    PoolSection,
    make_judge,
)
from alignlab.algorithms.online_preference.online_dpo import (
    OnlineDPOConfig,
    OnlineDPOSection,
    train_online_dpo,
)
from alignlab.cli.main import app
from alignlab.core.config import OnlineTrainSection, RolloutSection, WorldSection, load_config
from alignlab.core.errors import ConfigError
from alignlab.models.fingerprint import directory_fingerprint
from alignlab.rewards.annotator_pool import DEFAULT_POOL, AnnotatorPool
from alignlab.rewards.judges import AnnotatorJudge, BudgetedJudge, LLMJudge


@pytest.mark.parametrize("override,expected", [
    ("online_dpo.judge.kind=oracle", r"field 'online_dpo.judge.kind': got 'oracle'; allowed "
                                     r"values: 'reward', 'annotator', 'pool', 'llm' or "
                                     r"'preference_model'"),
    ("online_dpo.judge.llm.mode=score", r"field 'online_dpo.judge.llm.mode': got 'score'; "
                                        r"allowed values: 'logprob' or 'generate'"),
    ("online_dpo.judge.llm.on_parse_error=ignore", r"'online_dpo.judge.llm.on_parse_error'.*'skip'"),
    ("online_dpo.judge.max_labels=0", r"field 'online_dpo.judge.max_labels': .*greater than 0"),
    ("online_dpo.judge.pool.annotators=[{name: x, position_bias: 2}]",
     r"field 'online_dpo.judge.pool.annotators.0.position_bias'"),
])
def test_bad_judge_settings_name_the_field_and_the_allowed_values(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(OnlineDPOConfig, overrides=[override])


def test_settings_the_kind_does_not_read_are_refused(tiny_world):
    task = tiny_world.task("positive")
    with pytest.raises(ConfigError, match=r"field 'online_dpo.judge.flip_rate': not used by "
                                          r"online_dpo.judge.kind=llm; it applies to kind annotator, pool"):
        make_judge(JudgeSection(kind="llm", flip_rate=0.2), task, 0, world=WorldSection())
    with pytest.raises(ConfigError, match=r"'online_dpo.judge.llm': not used by online_dpo.judge.kind=pool"):
        make_judge(JudgeSection(kind="pool", llm=LLMJudgeSection(debias=False)), task, 0,
                   world=WorldSection())
    with pytest.raises(ConfigError, match=r"'online_dpo.judge.pool': .*names must differ"):
        make_judge(JudgeSection(kind="pool", pool=PoolSection(annotators=[
            PoolAnnotatorSection(name="x"), PoolAnnotatorSection(name="x")])), task, 0,
            world=WorldSection())


def test_make_judge_builds_each_kind_inside_the_budget(tiny_world, world_cache, tmp_path):
    task, world = tiny_world.task("positive"), WorldSection(preset="tiny", cache_dir=world_cache)
    pool = make_judge(JudgeSection(kind="pool", flip_rate=0.25, tie_margin=0.01, max_labels=3),
                      task, 5, world=world)
    assert isinstance(pool, BudgetedJudge) and pool.max_labels == 3
    assert isinstance(pool.inner, AnnotatorPool) and pool.inner.flip_rate == 0.25
    assert [a.name for a in pool.inner.annotators] == [a.name for a in DEFAULT_POOL]
    assert {a.tie_margin for a in pool.inner.annotators} == {0.01} and pool.inner.seed == 5
    annotator = make_judge(JudgeSection(kind="annotator", cache=str(tmp_path / "a.jsonl")),
                           task, 0, world=world)
    assert isinstance(annotator.inner, AnnotatorJudge)
    prompts, a, b = task.train_prompts[:2], ["it was great .", "bad"], ["it was awful .", "fine"]
    annotator.judge(prompts, a, b)
    annotator.judge(prompts, a, b)  # the single annotator's cache is free too
    assert (annotator.labels_used, annotator.cache_hits) == (2, 2)

    template = tmp_path / "judge.yaml"
    template.write_text("version: mine-v1\ntext: 'Q: {prompt}\\nA: {a}\\nB: {b}\\nBetter:'\n")
    llm = make_judge(JudgeSection(kind="llm", llm=LLMJudgeSection(template=str(template))),
                     task, 0, world=world)
    assert isinstance(llm.inner, LLMJudge) and llm.inner.template.version == "mine-v1"
    assert llm.inner.fingerprint == directory_fingerprint(tiny_world.base_dir)
    [v] = llm.judge(prompts[:1], a[:1], b[:1])
    assert 0 < v.p_a < 1
    template.write_text("text: 'no version'\n")
    with pytest.raises(ConfigError, match=r"field 'online_dpo.judge.llm.template': .*version"):
        make_judge(JudgeSection(kind="llm", llm=LLMJudgeSection(template=str(template))),
                   task, 0, world=world)


# Seed 0, 4 iterations of 4 prompts x 2 samples, judge.kind=pool with max_labels=6: the budget
# runs out in iteration 2 and the later iterations learn nothing.
def test_online_dpo_with_the_pool_and_a_budget_logs_labels_used(world_cache, tmp_path):
    cfg = OnlineDPOConfig(
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        train=OnlineTrainSection(output_dir=str(tmp_path), max_steps=4, lr=1e-3, batch_size=32,
                                 progress=False, tensorboard=False),
        rollout=RolloutSection(prompts="world:positive", prompts_per_step=4, n=2,
                               max_new_tokens=12),
        online_dpo=OnlineDPOSection(beta=0.1, judge=JudgeSection(kind="pool", flip_rate=0.1,
                                                                 max_labels=6)))
    run = train_online_dpo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(run.result.history) == 4
    asked = 0
    for row in rows:
        asked += row["pairs"] + row["ties"] + row["skipped"]
        assert row["pairs"] + row["ties"] + row["skipped"] + row["dropped_identical"] == 4
        assert row["labels_used"] == min(6, asked - row["judge_cache_hits"])
    print("labels_used per iteration:", [r["labels_used"] for r in rows])
    assert rows[-1]["labels_used"] == 6  # the budget, exactly
    assert rows[-1]["skipped"] > 0 and rows[-1].get("update_skipped") == 1


def test_online_dpo_with_the_llm_judge_from_the_cli(world_cache, tmp_path):
    out = tmp_path / "odpo"
    result = CliRunner().invoke(app, [
        "train", "online_dpo", "--config", "examples/online_dpo_world.yaml",
        "--set", "world.preset=tiny", "--set", f"world.cache_dir={world_cache}",
        "--set", f"train.output_dir={out}", "--set", "train.max_steps=1",
        "--set", "train.progress=false", "--set", "rollout.prompts_per_step=2",
        "--set", "rollout.max_new_tokens=8", "--set", "online_dpo.judge.kind=llm"])
    assert result.exit_code == 0, result.output
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["labels_used"] + row["judge_cache_hits"] == row["pairs"] + row["ties"]
    assert 0 < row["judge_p_chosen_mean"] < 1
