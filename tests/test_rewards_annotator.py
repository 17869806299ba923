"""The simulated annotator: Bradley-Terry draws, label flips, length bias, seeding, caching."""

from __future__ import annotations

import math
import random

import pytest

from alignlab.core.errors import ConfigError
from alignlab.rewards.annotator import SimulatedAnnotator


def word_gold(prompts, completions):
    """+1 per 'good', −1 per 'bad': a gold reward whose values are easy to compute by hand."""
    return [float(c.split().count("good") - c.split().count("bad")) for c in completions]


def random_pairs(n: int, seed: int = 0, words=("good", "bad", "ok", "fine", "meh")):
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) + f" #{i}" for i in range(2 * n)]
    return [f"p{i % 7}" for i in range(n)], texts[:n], texts[n:]


def test_labels_are_deterministic_order_independent_and_mirror_on_swap():
    prompts, a, b = random_pairs(300)
    ann = SimulatedAnnotator(word_gold, temperature=1.0, flip_rate=0.25, seed=3)
    first = [lab.a_preferred for lab in ann.label_pairs(prompts, a, b)]
    again = SimulatedAnnotator(word_gold, temperature=1.0, flip_rate=0.25, seed=3)
    rev = [lab.a_preferred for lab in again.label_pairs(prompts[::-1], a[::-1], b[::-1])][::-1]
    swapped = [lab.a_preferred for lab in again.label_pairs(prompts, b, a)]
    assert first == rev
    assert swapped == [not x for x in first]
    other_seed = SimulatedAnnotator(word_gold, temperature=1.0, flip_rate=0.25, seed=4)
    assert [lab.a_preferred for lab in other_seed.label_pairs(prompts, a, b)] != first


def test_bradley_terry_probability_on_a_hand_computed_pair():
    ann = SimulatedAnnotator(word_gold, temperature=0.5, flip_rate=0.0)
    (lab,) = ann.label_pairs(["p"], ["good good ok"], ["bad"])
    assert lab.gold_a == 2.0 and lab.gold_b == -1.0
    assert lab.p_a == pytest.approx(1 / (1 + math.exp(-3.0 / 0.5)))
    # Empirical choice frequency on many pairs with the same gold gap of 1 at T = 1: σ(1) = 0.731.
    n = 3000
    ann = SimulatedAnnotator(word_gold, temperature=1.0, flip_rate=0.0)
    labels = ann.label_pairs(["p"] * n, [f"good #{i}" for i in range(n)], [f"ok #{i}" for i in range(n)])
    freq = sum(lab.a_preferred for lab in labels) / n
    assert freq == pytest.approx(1 / (1 + math.e ** -1), abs=0.03)


@pytest.mark.parametrize("temperature", [0.0, 1e-3])
def test_without_noise_the_annotator_agrees_with_gold(temperature):
    prompts, a, b = random_pairs(500)
    ann = SimulatedAnnotator(word_gold, temperature=temperature, flip_rate=0.0)
    labels = ann.label_pairs(prompts, a, b)
    decided = [lab for lab in labels if lab.gold_a != lab.gold_b]
    assert len(decided) > 300
    assert all(lab.a_preferred == (lab.gold_a > lab.gold_b) for lab in decided)
    assert ann.stats.agreement == 1.0 and ann.stats.flipped == 0


def test_measured_flip_rate_matches_the_configured_one():
    prompts, a, b = random_pairs(4000, seed=1)
    ann = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=0.25, seed=0)
    ann.label_pairs(prompts, a, b)
    s = ann.stats
    # 3 standard deviations of a binomial fraction over 4000 pairs is 0.021.
    assert s.flip_fraction == pytest.approx(0.25, abs=0.021)
    # At temperature 0 the only disagreements with gold are the flips.
    assert s.agreement == pytest.approx(1 - 0.25, abs=0.025)


def test_length_bias_shifts_choices_toward_longer_completions():
    n = 400
    # Equal gold (0), the second completion five words longer.
    short = [f"ok #{i}" for i in range(n)]
    long_ = [f"ok ok ok ok ok ok #{i}" for i in range(n)]
    unbiased = SimulatedAnnotator(word_gold, temperature=0.5, flip_rate=0.0)
    biased = SimulatedAnnotator(word_gold, temperature=0.5, flip_rate=0.0, length_bias=0.2)
    p_long_unbiased = sum(not lab.a_preferred for lab in unbiased.label_pairs(["p"] * n, short, long_)) / n
    p_long_biased = sum(not lab.a_preferred for lab in biased.label_pairs(["p"] * n, short, long_)) / n
    assert p_long_unbiased == pytest.approx(0.5, abs=0.08)
    # σ(5 words · 0.2 / 0.5) = σ(2) = 0.88
    assert p_long_biased == pytest.approx(0.881, abs=0.05)


def test_cache_hit_returns_identical_labels_without_calling_gold(tmp_path):
    prompts, a, b = random_pairs(200)
    cache = tmp_path / "labels.jsonl"
    first = SimulatedAnnotator(word_gold, name="words", temperature=1.0, seed=5, cache_path=cache)
    labels = first.label_pairs(prompts, a, b)
    points = first.label_points(prompts, a, threshold=0.5)

    def no_gold(prompts, completions):
        raise AssertionError("gold was recomputed despite the cache")

    second = SimulatedAnnotator(no_gold, name="words", temperature=1.0, seed=5, cache_path=cache)
    assert second.label_pairs(prompts, a, b) == labels
    assert second.label_points(prompts, a, threshold=0.5) == points
    assert second.stats.cache_hits == 400
    # Different settings are different keys: the gold is needed again.
    with pytest.raises(AssertionError, match="recomputed"):
        SimulatedAnnotator(no_gold, name="words", temperature=1.0, seed=6, cache_path=cache).label_pairs(prompts, a, b)


def test_a_truncated_cache_line_is_skipped(tmp_path):
    cache = tmp_path / "labels.jsonl"
    SimulatedAnnotator(word_gold, cache_path=cache).label_pairs(["p"], ["good"], ["bad"])
    cache.write_text(cache.read_text() + '{"key": "abc", "lab')
    ann = SimulatedAnnotator(word_gold, cache_path=cache)
    ann.label_pairs(["p"], ["good"], ["bad"])
    assert ann.stats.cache_hits == 1


def test_ties_are_recorded_when_gold_is_within_the_margin():
    ann = SimulatedAnnotator(word_gold, tie_margin=0.5, flip_rate=0.25)
    tie, clear = ann.label_pairs(["p", "p"], ["good ok", "good"], ["good fine", "bad"])
    assert tie.a_preferred is None and not tie.flipped
    assert clear.a_preferred is not None
    assert ann.stats.ties == 1


def test_listwise_ranking_follows_gold_without_noise_and_reverses_on_flip():
    lists = [["good good", "bad", "ok", "good"], ["bad bad", "good good good", "ok"]]
    ann = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=0.0)
    ranks = ann.rank(["p", "q"], lists)
    assert ranks[0].order == [0, 3, 2, 1] and ranks[1].order == [1, 2, 0]
    assert ranks[0].scores == [2.0, -1.0, 0.0, 1.0]
    assert ann.stats.agreement == 1.0
    flipped = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=1.0).rank(["p"], lists[:1])[0]
    assert flipped.flipped and flipped.order == [1, 2, 3, 0]
    # Order independence: a permuted list gets the same score per completion.
    perm = SimulatedAnnotator(word_gold, temperature=1.0, seed=2).rank(["p"], [lists[0][::-1]])[0]
    base = SimulatedAnnotator(word_gold, temperature=1.0, seed=2).rank(["p"], lists[:1])[0]
    assert perm.scores == base.scores[::-1]


def test_unpaired_labels_threshold_the_noisy_gold():
    completions = ["good good", "bad", "ok", "good", "bad bad"]
    ann = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=0.0)
    labels = ann.label_points(["p"] * 5, completions, threshold=0.5)
    assert [lab.label for lab in labels] == [True, False, False, True, False]
    n = 2000
    noisy = SimulatedAnnotator(word_gold, temperature=0.0, flip_rate=0.25)
    labels = noisy.label_points(["p"] * n, [f"good #{i}" for i in range(n)], threshold=0.5)
    assert sum(not lab.label for lab in labels) / n == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize("field,value", [("flip_rate", 1.5), ("temperature", -1.0), ("tie_margin", -0.1)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SimulatedAnnotator(word_gold, **{field: value})
