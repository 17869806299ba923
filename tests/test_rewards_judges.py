"""Judges and critics: pairwise verdicts by hand, the shared pair-building step."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from alignlab.rewards.annotator import SimulatedAnnotator
from alignlab.rewards.judges import (
    AnnotatorJudge,
    JudgedPair,
    PairwiseJudge,
    RewardJudge,
    TextCritic,
    ThresholdCritic,
    Verdict,
    judge_pairs,
)


def length_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def test_reward_judge_is_bradley_terry_on_the_reward_difference_and_ties_on_equal_rewards():
    judge = RewardJudge(length_reward, temperature=2.0)
    assert isinstance(judge, PairwiseJudge)
    v = judge.judge(["p", "p", "p"], ["aaaa", "a", "bb"], ["a", "aaaa", "cc"])
    # r_a − r_b = 3, −3, 0 at τ = 2
    assert v[0].p_a == pytest.approx(1 / (1 + math.exp(-1.5))) and v[0].a_preferred is True
    assert v[1].p_a == pytest.approx(1 / (1 + math.exp(1.5))) and v[1].a_preferred is False
    assert v[2].p_a == 0.5 and v[2].a_preferred is None
    assert v[0].detail == (4.0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        RewardJudge(length_reward, temperature=0.0)


def test_annotator_judge_returns_the_annotators_labels():
    def gold(prompts, completions):
        return [len(c) / 10 for c in completions]

    annotator = SimulatedAnnotator(gold, temperature=0.05, flip_rate=0.3, seed=4)
    twin = SimulatedAnnotator(gold, temperature=0.05, flip_rate=0.3, seed=4)
    a, b = ["x" * i for i in range(1, 21)], ["y" * (21 - i) for i in range(1, 21)]
    verdicts = AnnotatorJudge(annotator).judge(["p"] * 20, a, b)
    labels = twin.label_pairs(["p"] * 20, a, b)
    assert [v.a_preferred for v in verdicts] == [lab.a_preferred for lab in labels]
    assert [v.p_a for v in verdicts] == [lab.p_a for lab in labels]
    assert any(lab.flipped for lab in labels)  # flips reach the verdict, not just P(a ≻ b)


def test_judge_pairs_pairs_neighbours_drops_identical_pairs_and_respects_the_limit():
    counts: Counter = Counter()
    groups = [["aaa", "b", "cc", "cc", "odd"], ["d", "eeee"]]
    pairs = judge_pairs(["p0", "p1"], groups, RewardJudge(length_reward), counts=counts)
    assert [(p.group, p.a, p.b) for p in pairs] == [(0, 0, 1), (1, 0, 1)]
    assert counts["dropped_identical"] == 1  # ("cc", "cc"); "odd" has no partner
    assert (pairs[0].chosen, pairs[0].rejected) == (0, 1)  # "aaa" is longer
    assert (pairs[1].chosen, pairs[1].rejected) == (1, 0)  # "eeee" is longer
    assert len(judge_pairs(["p0", "p1"], groups, RewardJudge(length_reward), limit=1)) == 1
    assert judge_pairs(["p"], [["same", "same"]], RewardJudge(length_reward)) == []


def test_judge_pairs_drops_and_counts_pairs_the_judge_leaves_unlabelled():
    class EveryOther:
        def judge(self, prompts, a, b):
            return [Verdict(1.0, True) if i % 2 == 0 else None for i in range(len(prompts))]

    counts: Counter = Counter()
    pairs = judge_pairs(["p0", "p1", "p2"], [["a", "b"], ["c", "d"], ["e", "f"]], EveryOther(),
                        counts=counts)
    assert [p.group for p in pairs] == [0, 2]
    assert counts["skipped"] == 1
    clean: Counter = Counter()
    judge_pairs(["p"], [["a", "b"]], RewardJudge(length_reward), counts=clean)
    assert "skipped" not in clean  # no key when nothing was skipped (stats stay as they were)


def test_a_tie_keeps_a_first():
    pair = JudgedPair(0, 2, 3, Verdict(0.5, None))
    assert (pair.chosen, pair.rejected) == (2, 3)


def test_threshold_critic_writes_praise_or_advice_with_the_score():
    critic = ThresholdCritic(length_reward, 3.0, praise="Long enough.", advice="Say more.")
    assert isinstance(critic, TextCritic)
    assert critic.critique(["p", "p"], ["abcd", "ab"]) == ["Long enough. (score 4.00)",
                                                           "Say more. (score 2.00)"]
