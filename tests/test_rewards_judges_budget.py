"""The labelling budget: it stops at max_labels exactly, cache hits are free, the refused pairs
get no verdict and are counted, and its counters survive a checkpoint."""

from __future__ import annotations

from collections import Counter

import pytest

from alignlab.core.errors import ConfigError
from alignlab.rewards.annotator_pool import AnnotatorPool
from alignlab.rewards.judges import BudgetedJudge, RewardJudge, judge_pairs


def gold(prompts, completions):
    return [float(len(c)) for c in completions]


def pairs(n: int, start: int = 0):
    return ([f"p{i}" for i in range(start, start + n)], [f"a{'a' * i}" for i in range(start, start + n)],
            [f"b{i}" for i in range(start, start + n)])


def test_the_budget_stops_at_max_labels_exactly_and_cache_hits_are_free():
    judge = BudgetedJudge(AnnotatorPool(gold), max_labels=5)
    prompts, a, b = pairs(8)
    first = judge.judge(prompts, a, b)
    assert [v is not None for v in first] == [True] * 5 + [False] * 3
    assert (judge.labels_used, judge.cache_hits, judge.skipped, judge.labels_left) == (5, 0, 3, 0)
    again = judge.judge(prompts, a, b)  # the 5 labelled pairs come back free; the rest cannot
    assert again[:5] == first[:5] and again[5:] == [None] * 3
    assert (judge.labels_used, judge.cache_hits, judge.skipped) == (5, 5, 6)
    assert judge.inner.counters() == {"hits": 5, "misses": 5}  # the pool labelled 5 pairs, once


def test_a_repeated_pair_is_paid_once_by_a_cached_judge_and_twice_by_one_without_a_cache():
    cached = BudgetedJudge(AnnotatorPool(gold), max_labels=2)
    out = cached.judge(["p", "p", "q"], ["x", "x", "y"], ["z", "z", "w"])
    assert all(v is not None for v in out) and (cached.labels_used, cached.cache_hits) == (2, 1)
    plain = BudgetedJudge(RewardJudge(gold), max_labels=2)
    out = plain.judge(["p", "p", "q"], ["x", "x", "y"], ["z", "z", "w"])
    assert [v is not None for v in out] == [True, True, False] and plain.labels_used == 2


def test_judge_pairs_counts_the_pairs_the_budget_refused():
    judge = BudgetedJudge(RewardJudge(gold), max_labels=3)
    counts: Counter = Counter()
    groups = [["a", "bb"], ["c", "dd"], ["e", "ff"], ["g", "hh"], ["i", "jj"]]
    judged = judge_pairs([f"p{i}" for i in range(5)], groups, judge, counts=counts)
    assert [p.group for p in judged] == [0, 1, 2] and counts["skipped"] == 2


def test_unlimited_still_counts_and_the_counters_round_trip():
    judge = BudgetedJudge(AnnotatorPool(gold))
    judge.judge(*pairs(4))
    judge.judge(*pairs(6))
    state = judge.counters()
    assert state == {"labels_used": 6, "cache_hits": 4, "skipped": 0,
                     "inner": {"hits": 4, "misses": 6}}
    restored = BudgetedJudge(AnnotatorPool(gold))
    restored.load_counters(state)
    assert restored.counters() == state
    with pytest.raises(ConfigError, match="max_labels"):
        BudgetedJudge(RewardJudge(gold), max_labels=-1)
