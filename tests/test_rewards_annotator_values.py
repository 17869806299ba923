"""The annotator's rules at their boundaries (the tie margin, temperature 0, thresholds) and the
statistics it keeps, by hand."""

from __future__ import annotations

from alignlab.rewards.annotator import SimulatedAnnotator


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
