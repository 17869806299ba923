"""The annotator's rules at their boundaries (the tie margin, temperature 0, thresholds) and the
statistics it keeps, by hand."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random

import pytest

from alignlab.rewards.annotator import AnnotatorStats, SimulatedAnnotator


def word_gold(prompts, completions):
    """+1 per 'good', −1 per 'bad'."""
    return [float(c.split().count("good") - c.split().count("bad")) for c in completions]


def test_a_gold_difference_of_exactly_tie_margin_is_a_tie():
    ann = SimulatedAnnotator(word_gold, tie_margin=1.0, flip_rate=0.0)
    at_margin, above = ann.label_pairs(["p", "p"], ["good", "good"], ["ok", "bad"])
    assert at_margin.a_preferred is None  # |1 − 0| = 1 = tie_margin
    assert above.a_preferred is True  # |1 − (−1)| = 2 > tie_margin
    assert ann.stats.ties == 1 and ann.stats.judgements == 2
    zero = SimulatedAnnotator(word_gold, tie_margin=0.0, flip_rate=0.0)
    equal, different = zero.label_pairs(["p", "p"], ["good x", "good"], ["good y", "ok"])
    assert equal.a_preferred is None and different.a_preferred is True


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_pair_probability_with_length_bias_and_the_mirror_of_a_swap():
    ann = SimulatedAnnotator(word_gold, temperature=0.5, flip_rate=0.0, length_bias=0.25)
    (lab,) = ann.label_pairs(["p"], ["good ok ok"], ["bad"])
    # ũ = gold + 0.25·words: (1 + 0.75) − (−1 + 0.25) = 2.5, over T = 0.5
    assert lab.p_a == pytest.approx(sig(5.0))
    (swapped,) = ann.label_pairs(["p"], ["bad"], ["good ok ok"])
    assert swapped.p_a == pytest.approx(1 - sig(5.0))
    assert (swapped.gold_a, swapped.gold_b) == (-1.0, 1.0)
    assert swapped.a_preferred is (not lab.a_preferred)


def test_temperature_zero_is_a_step_with_one_half_at_equal_utility():
    ann = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=0.0)
    better, worse, equal = ann.label_pairs(["p"] * 3, ["good", "bad", "ok x"], ["ok", "ok", "ok y"])
    assert (better.p_a, worse.p_a, equal.p_a) == (1.0, 0.0, 0.5)
    assert better.a_preferred is True and worse.a_preferred is False
    points = ann.label_points(["p"] * 3, ["good", "bad", "ok"], threshold=0.0)
    assert [pt.p_desirable for pt in points] == [1.0, 0.0, 0.5]
    assert [pt.label for pt in points[:2]] == [True, False]


def test_point_probability_and_the_flip():
    ann = SimulatedAnnotator(word_gold, temperature=2.0, flip_rate=0.0)
    (pt,) = ann.label_points(["p"], ["good good"], threshold=0.5)
    assert pt.p_desirable == pytest.approx(sig((2.0 - 0.5) / 2.0)) and pt.gold == 2.0
    always = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=1.0)
    (flipped,) = always.label_points(["p"], ["good"], threshold=0.0)
    assert flipped.flipped and flipped.label is False
    (pair,) = always.label_pairs(["p"], ["good"], ["bad"])
    assert pair.flipped and pair.a_preferred is False and pair.gold_agrees is False


def test_stats_count_judgements_comparisons_agreement_and_flips():
    ann = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=0.0, tie_margin=0.0)
    before = dataclasses.replace(ann.stats)
    labels = ann.label_pairs(["p"] * 3, ["good", "ok x", "bad"], ["bad", "ok y", "good"])
    assert [lab.gold_agrees for lab in labels] == [True, None, True]
    ann.label_points(["p"] * 2, ["good", "ok"], threshold=0.0)  # the second is undecided
    ann.rank(["p"], [["good", "bad", "ok"]])  # three decided comparisons
    s = ann.stats - before
    assert (s.judgements, s.comparisons, s.agree, s.ties, s.flipped) == (6, 6, 6, 1, 0)
    d = s.as_dict()
    assert d["agreement"] == 1.0 and d["flip_fraction"] == 0.0 and d["cache_hits"] == 0
    empty = AnnotatorStats()
    assert math.isnan(empty.agreement) and math.isnan(empty.flip_fraction)


def test_rank_scores_at_temperature_zero_and_reversed_on_a_flip():
    ann = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=0.0, length_bias=0.5)
    (lab,) = ann.rank(["p"], [["bad", "good good", "ok"]])
    assert lab.scores == [-1.0 + 0.5, 2.0 + 1.0, 0.0 + 0.5] and lab.order == [1, 2, 0]
    flip = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=1.0)
    (rev,) = flip.rank(["p"], [["bad", "good good", "ok"]])
    assert rev.flipped and rev.scores == [1.0, -2.0, -0.0] and rev.order == [0, 2, 1]


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(flip_rate=0.0),
                                      dict(flip_rate=1.0), dict(tie_margin=0.0)])
def test_boundary_settings_are_accepted(settings):
    SimulatedAnnotator(word_gold, **settings)


def test_for_task_uses_the_task_gold_and_name():
    class Task:
        name = "words"
        gold = staticmethod(word_gold)

    ann = SimulatedAnnotator.for_task(Task(), temperature=0.0, flip_rate=0.0)
    assert ann.name == "words" and ann.label_pairs(["p"], ["good"], ["bad"])[0].a_preferred


def test_listwise_first_place_follows_plackett_luce():
    n = 3000
    ann = SimulatedAnnotator(word_gold, temperature=1.0, flip_rate=0.0)
    lists = [[f"good good #{i}", f"good #{i}", f"ok #{i}"] for i in range(n)]
    firsts = [lab.order[0] for lab in ann.rank(["p"] * n, lists)]
    # Gumbel-max: P(first = item 0) = e²/(e² + e + 1) = 0.665 (3 sd = 0.026)
    assert firsts.count(0) / n == pytest.approx(math.exp(2) / (math.exp(2) + math.e + 1), abs=0.026)


def test_rank_agreement_counts_a_tie_in_scores_as_a_disagreement():
    ann = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=0.0, length_bias=0.5)
    (lab,) = ann.rank(["p"], [["good", "ok ok ok"]])  # ũ = 1 + 0.5 = 0 + 1.5: tied scores
    assert lab.scores == [1.5, 1.5]
    assert (ann.stats.comparisons, ann.stats.agree) == (1, 0)


def test_tie_records_both_golds_and_gold_sees_each_prompt():
    ann = SimulatedAnnotator(word_gold, tie_margin=1.0)
    (tie,) = ann.label_pairs(["p"], ["good x"], ["good bad good y"])
    assert tie.a_preferred is None and (tie.gold_a, tie.gold_b) == (1.0, 1.0)
    (tie,) = ann.label_pairs(["p"], ["good"], ["ok"])
    assert (tie.gold_a, tie.gold_b) == (1.0, 0.0)

    def prompt_gold(prompts, completions):  # 1 when the completion repeats its prompt
        return [float(p == c) for p, c in zip(prompts, completions)]

    both = SimulatedAnnotator(prompt_gold, temperature=0.0, flip_rate=0.0)
    first, second = both.label_pairs(["aa", "bbb"], ["aa", "x"], ["y", "bbb"])
    assert (first.gold_a, first.gold_b, second.gold_a, second.gold_b) == (1.0, 0.0, 0.0, 1.0)


def test_default_settings_and_a_cache_in_a_new_folder(tmp_path):
    defaults = {f.name: f.default for f in dataclasses.fields(SimulatedAnnotator)
                if f.default is not dataclasses.MISSING}
    assert defaults == {"name": "gold", "temperature": 0.05, "flip_rate": 0.25, "length_bias": 0.0,
                        "tie_margin": None, "seed": 0, "cache_path": None}
    cache = tmp_path / "new" / "deeper" / "labels.jsonl"
    SimulatedAnnotator(word_gold, cache_path=cache).label_pairs(["p"], ["good"], ["bad"])
    assert cache.exists()


def test_stats_difference_subtracts_and_a_str_cache_path_works(tmp_path):
    ann = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=0.0,
                             cache_path=str(tmp_path / "labels.jsonl"))
    ann.label_pairs(["p"] * 2, ["good", "bad"], ["bad", "good"])
    before = dataclasses.replace(ann.stats)
    ann.label_pairs(["p"], ["good x"], ["bad x"])
    assert (ann.stats - before).judgements == 1 and (ann.stats - before).agree == 1


def test_gold_receives_each_completion_with_its_own_prompt():
    def gold(prompts, completions):  # depends on the prompt, so misaligned prompts show
        return [10.0 * len(p) + (p == c) for p, c in zip(prompts, completions)]

    ann = SimulatedAnnotator(gold, temperature=0.0, flip_rate=0.0)
    first, second = ann.label_pairs(["a", "bbb"], ["a", "x"], ["y", "bbb"])
    assert (first.gold_a, first.gold_b) == (11.0, 10.0)
    assert (second.gold_a, second.gold_b) == (30.0, 31.0)


def test_each_draw_follows_the_documented_recipe_and_the_cache_is_ascii(tmp_path):
    # The randomness of a judgement is random.Random(int(sha256(key), 16)) with the key the JSON
    # of [settings, kind, prompt, items in sorted order] (UTF-8, not ASCII-escaped). Pinning it
    # keeps labels reproducible across versions and existing caches valid.
    cache = tmp_path / "labels.jsonl"
    ann = SimulatedAnnotator(word_gold, temperature=0.5, flip_rate=0.25, seed=3, cache_path=cache)
    prompt = "café ☕"

    def rng_of(kind, items):
        settings = {"v": 1, "name": "gold", "seed": 3, "temperature": 0.5, "flip_rate": 0.25,
                    "length_bias": 0.0, "tie_margin": None}
        blob = json.dumps([settings, kind, prompt, items], ensure_ascii=False)
        return random.Random(int(hashlib.sha256(blob.encode("utf-8")).hexdigest(), 16))

    # a list: s_i = ũ_i + T·Gumbel_i in sorted order ("bad x", "good good", "ok"), then the flip
    rng = rng_of("list", ["bad x", "good good", "ok"])
    gumbel = [-math.log(-math.log(rng.random())) for _ in range(3)]
    flipped = rng.random() < 0.25
    scores = [(g + 0.5 * z) * (-1 if flipped else 1) for g, z in zip([-1.0, 2.0, 0.0], gumbel)]
    (lab,) = ann.rank([prompt], [["ok", "bad x", "good good"]])
    assert lab.flipped is flipped
    assert lab.scores == pytest.approx([scores[2], scores[0], scores[1]], rel=1e-12)
    # a pair: u_draw then u_flip
    rng = rng_of("pair", ["bad x", "good"])
    u_draw, u_flip = rng.random(), rng.random()
    p_a = sig((-1.0 - 1.0) / 0.5)
    (pair,) = ann.label_pairs([prompt], ["bad x"], ["good"])
    assert pair.p_a == pytest.approx(p_a)
    assert (pair.a_preferred, pair.flipped) == ((u_draw < p_a) != (u_flip < 0.25), u_flip < 0.25)
    # the cache holds keys and numbers only, ASCII whatever the prompt's language
    assert cache.read_bytes().isascii() and len(cache.read_text().splitlines()) == 2


def test_points_are_judged_against_zero_by_default():
    ann = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=0.0)
    good, ok, bad = ann.label_points(["p"] * 3, ["good", "ok", "bad"])
    assert (good.p_desirable, ok.p_desirable, bad.p_desirable) == (1.0, 0.5, 0.0)


def test_repr_shows_the_settings_not_the_gold_function():
    text = repr(SimulatedAnnotator(word_gold, temperature=0.5))
    assert "word_gold" not in text and "gold=" not in text
    assert "name='gold'" in text and "temperature=0.5" in text


def test_cached_pairs_tells_which_labels_are_free():
    ann = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=0.0)
    ann.label_pairs(["p"], ["good"], ["bad"])
    # (b, a) is the same judgement as (a, b); another prompt or completion is not cached
    assert ann.cached_pairs(["p", "p", "q"], ["bad", "good", "good"], ["good", "ok", "bad"]) == [
        True, False, False]
