"""Preference data generation on the tiny world: rows load back and carry the gold signal."""

from __future__ import annotations

import json
import statistics

import pytest
from typer.testing import CliRunner

from alignlab.cli.data import data_app
from alignlab.data.loading import load_rows, rows_from_list
from alignlab.engine import preference_data as gen
from alignlab.engine.preference_data import generate_preferences, rso_pairs
from alignlab.models.loading import load_model, load_tokenizer
from alignlab.rewards.annotator import SimulatedAnnotator
from alignlab.rollout.sampling import Samples


@pytest.fixture(scope="module")
def policy(tiny_world):
    return load_model(str(tiny_world.base_dir)), load_tokenizer(str(tiny_world.base_dir))


def _gold_means(task, rows, a="chosen", b="rejected"):
    prompts = [r["prompt"] for r in rows]
    return (statistics.fmean(task.gold(prompts, [r[a] for r in rows])),
            statistics.fmean(task.gold(prompts, [r[b] for r in rows])))


def test_preference_rows_load_back_and_chosen_beats_rejected_on_gold(tiny_world, policy, tmp_path):
    task = tiny_world.task("positive")
    rows = generate_preferences(*policy, task, 96, seed=1, margin=True)
    assert len(rows) == 96 and rows.stats["shortfall"] == 0
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_rows(path, format="preference")
    assert len(loaded) == 96 and all(r["prompt"] in task.train_prompts for r in loaded)
    chosen, rejected = _gold_means(task, loaded)
    # Base-model samples differ in sentiment by about 0.5 on average; 25% of labels are flipped.
    assert chosen > rejected + 0.2, (chosen, rejected)
    assert rows.stats["gold_chosen_mean"] == pytest.approx(chosen)
    assert all(r["margin"] == pytest.approx(c - j) for r, c, j in zip(
        loaded, task.gold([r["prompt"] for r in loaded], [r["chosen"] for r in loaded]),
        task.gold([r["prompt"] for r in loaded], [r["rejected"] for r in loaded])))
    ann = rows.stats["annotator"]
    assert ann["judgements"] == 96 and 0.1 < ann["flip_fraction"] < 0.4
    # Same seed, same rows.
    assert generate_preferences(*policy, task, 96, seed=1, margin=True) == rows


def test_unpaired_and_ranked_rows_load_back_with_the_gold_signal(tiny_world, policy):
    task = tiny_world.task("positive")
    flawless = SimulatedAnnotator.for_task(task, flip_rate=0.0)
    unpaired = generate_preferences(*policy, task, 64, format="unpaired", annotator=flawless, seed=2)
    rows_from_list(unpaired, format="unpaired")
    labels = [r["label"] for r in unpaired]
    assert 0.3 < sum(labels) / len(labels) < 0.7  # the default threshold is the median gold
    gold = task.gold([r["prompt"] for r in unpaired], [r["completion"] for r in unpaired])
    good = [g for g, lab in zip(gold, labels) if lab]
    bad = [g for g, lab in zip(gold, labels) if not lab]
    assert min(good) > unpaired.stats["threshold"] - 0.2 and statistics.fmean(good) > statistics.fmean(bad) + 0.3

    ranked = generate_preferences(*policy, task, 24, format="ranked", samples_per_prompt=4, seed=3)
    rows_from_list(ranked, format="ranked")
    assert len(ranked) == 24 and all(len(r["completions"]) >= 2 for r in ranked)
    # The default annotator reverses 25% of the lists, which halves the expected top-bottom gap.
    noisy_gap = ranked.stats["gold_top_mean"] - ranked.stats["gold_bottom_mean"]
    assert noisy_gap > 0.1
    # A flawless annotator at a near-zero temperature orders every list by gold.
    exact = SimulatedAnnotator.for_task(task, flip_rate=0.0, temperature=1e-6)
    ordered = generate_preferences(*policy, task, 24, format="ranked", samples_per_prompt=4, seed=3,
                                   annotator=exact)
    for row in ordered:
        gold = task.gold([row["prompt"]] * len(row["completions"]), row["completions"])
        by_score = [g for _, g in sorted(zip(row["scores"], gold), reverse=True)]
        assert all(a >= b - 1e-9 for a, b in zip(by_score, by_score[1:])), (row, gold)
    assert ordered.stats["gold_top_mean"] - ordered.stats["gold_bottom_mean"] > noisy_gap


def test_empty_and_identical_completions_are_dropped_and_counted(tiny_world, monkeypatch):
    task = tiny_world.task("positive")
    # Per prompt: a real pair, then an identical pair, then an empty completion and a real one.
    texts = [" good .", " bad .", " same .", " same .", "", " fine ."]

    def fake_sample(model, tokenizer, prompts, *, n, **kw):
        comps = [texts[i % len(texts)] for i in range(len(prompts) * n)]
        return Samples([p for p in prompts for _ in range(n)], comps, [[] for _ in comps], ["eos"] * len(comps))

    monkeypatch.setattr(gen, "sample", fake_sample)
    rows = generate_preferences(None, None, task, 2, samples_per_prompt=6, seed=0)
    # Each prompt yields 1 pair: (good, bad); (same, same) is dropped; the empty one leaves
    # (fine) without a partner. Expecting 3 pairs a prompt, the first round samples one prompt
    # and a second round tops up the missing row.
    assert len(rows) == 2 and rows.stats["rounds"] == 2
    assert rows.stats["dropped_identical"] == 2 and rows.stats["dropped_empty"] == 2
    assert {(r["chosen"], r["rejected"]) for r in rows} <= {(" good .", " bad ."), (" bad .", " good .")}


def test_rso_pairs_prefer_higher_gold_and_accept_toward_high_reward(tiny_world, policy):
    task = tiny_world.task("positive")
    rows = rso_pairs(*policy, task, 32, n_candidates=8, n_accept=4, beta=0.1, seed=0)
    rows_from_list(rows, format="preference")
    prompts = [r["prompt"] for r in rows]
    chosen = task.gold(prompts, [r["chosen"] for r in rows])
    rejected = task.gold(prompts, [r["rejected"] for r in rows])
    assert len(rows) == 32 and all(c > j for c, j in zip(chosen, rejected))  # labelled by gold, no noise
    # Rejection sampling with small β keeps the high-reward candidates: both sides of an RSO
    # pair beat a plain random pair's average.
    plain = generate_preferences(*policy, task, 32, seed=0, annotator=SimulatedAnnotator.for_task(task, flip_rate=0.0))
    assert statistics.fmean(rejected) > plain.stats["gold_rejected_mean"]
    assert statistics.fmean(chosen) > plain.stats["gold_chosen_mean"]


def test_cli_writes_rows_that_load_back_and_relabels_from_the_cache(tiny_world, world_cache, tmp_path):
    out = tmp_path / "pos_prefs.jsonl"
    args = ["preferences", "--task", "positive", "--n", "40", "--out", str(out), "--preset", "tiny",
            "--cache-dir", world_cache, "--label-cache", str(tmp_path / "labels.jsonl"), "--seed", "4"]
    result = CliRunner().invoke(data_app, args)
    assert result.exit_code == 0, result.output
    assert "gold_chosen_mean" in result.output and "annotator.flip_fraction" in result.output
    assert len(load_rows(out, format="preference")) == 40
    first = out.read_text()
    stats = json.loads((tmp_path / "pos_prefs.stats.json").read_text())
    assert stats["rows"] == 40 and stats["annotator"]["cache_hits"] == 0

    result = CliRunner().invoke(data_app, args)
    assert result.exit_code == 0, result.output
    assert out.read_text() == first
    assert json.loads((tmp_path / "pos_prefs.stats.json").read_text())["annotator"]["cache_hits"] == 40

    bad = CliRunner().invoke(data_app, args + ["--format", "pairs"])
    assert bad.exit_code != 0 and "--format" in str(bad.exception)
