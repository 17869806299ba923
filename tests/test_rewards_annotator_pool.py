"""The AlpacaFarm-style annotator pool: each bias by hand, seeded assignment, agreement with gold
falling as the flip rate rises, and the cache that stops relabelling."""

from __future__ import annotations

import json
import math

import pytest

from alignlab.core.errors import ConfigError
from alignlab.rewards.annotator_pool import (
    DEFAULT_POOL,
    AnnotatorPool,
    PoolAnnotator,
    agreement,
)
from alignlab.rewards.judges import PairwiseJudge


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


class Gold:
    """gold = #"good" − #"bad" in the completion; counts the completions it scores."""

    def __init__(self) -> None:
        self.scored = 0

    def __call__(self, prompts, completions):
        self.scored += len(completions)
        return [c.split().count("good") - c.split().count("bad") for c in completions]


def pairs(n: int) -> tuple[list[str], list[str], list[str]]:
    """n distinct pairs whose gold differs (a is better on even i, b on odd i)."""
    prompts = [f"prompt {i}" for i in range(n)]
    a = [f"good {'good ' * (i % 3)}item {i}" if i % 2 == 0 else f"bad item {i}" for i in range(n)]
    b = [f"bad thing {i}" if i % 2 == 0 else f"good thing {i}" for i in range(n)]
    return prompts, a, b


def test_the_label_probability_combines_every_bias_by_hand():
    ann = PoolAnnotator("x", temperature=0.5, length_bias=0.1, position_bias=0.2, flip_rate=0.1)
    pool = AnnotatorPool(Gold(), [ann], flip_rate=0.3)
    assert isinstance(pool, PairwiseJudge)
    [v] = pool.judge(["p"], ["good good"], ["good bad x"])
    # ũ_a = 2 + 0.1·2, ũ_b = 0 + 0.1·3; q = σ(1.9 / 0.5); s = π + (1 − π)q; φ = f + F − 2fF
    q = sigmoid(1.9 / 0.5)
    s = 0.2 + 0.8 * q
    phi = 0.1 + 0.3 - 2 * 0.1 * 0.3
    assert v.p_a == pytest.approx(s * (1 - phi) + (1 - s) * phi)
    assert v.detail["annotator"] == "x" and (v.detail["gold_a"], v.detail["gold_b"]) == (2, 0)


def test_a_sure_pair_a_tie_a_swap_a_first_shown_taste_and_a_taste_for_length():
    sure = AnnotatorPool(Gold(), [PoolAnnotator("exact", temperature=0.0, tie_margin=0.5)])
    v = sure.judge(["p"] * 3, ["good", "bad", "good x"], ["bad", "good", "good y z"])
    assert [(x.p_a, x.a_preferred) for x in v] == [(1.0, True), (0.0, False), (0.5, None)]
    first = AnnotatorPool(Gold(), [PoolAnnotator("first", temperature=0.0, position_bias=1.0)])
    assert [x.a_preferred for x in first.judge(["p", "p"], ["bad", "good"], ["good", "bad"])] == [
        True, True]  # always the response shown first, whichever it is
    verbose = AnnotatorPool(Gold(), [PoolAnnotator("long", temperature=0.0, length_bias=0.1)])
    [v] = verbose.judge(["p"], ["fine"], ["fine and much longer"])  # equal gold
    assert v.p_a == 0.0 and v.a_preferred is False


def test_labels_follow_their_probability_over_many_pairs():
    pool = AnnotatorPool(Gold(), [PoolAnnotator("x", temperature=1.0, position_bias=0.1,
                                                flip_rate=0.2)], flip_rate=0.1, seed=3)
    n = 4000
    verdicts = pool.judge(["p"] * n, [f"good {i}" for i in range(n)], [f"bad {i}" for i in range(n)])
    p = verdicts[0].p_a  # all pairs: gold 1 vs −1, equal length
    freq = sum(v.a_preferred for v in verdicts) / n
    assert abs(freq - p) < 3 * math.sqrt(p * (1 - p) / n), (freq, p)


def test_assignment_is_seeded_per_example_and_independent_of_order_and_batch():
    prompts, a, b = pairs(200)
    pool = AnnotatorPool(Gold(), seed=7)
    who = pool.assign(prompts, a, b)
    assert set(who) == set(range(len(DEFAULT_POOL)))  # every annotator gets examples
    assert pool.assign(prompts, b, a) == who  # the swapped pair goes to the same annotator
    assert pool.assign(prompts[::-1], a[::-1], b[::-1]) == who[::-1]
    assert AnnotatorPool(Gold(), seed=8).assign(prompts, a, b) != who
    together = pool.judge(prompts, a, b)
    alone = [AnnotatorPool(Gold(), seed=7).judge([p], [x], [y])[0]
             for p, x, y in zip(prompts[:20], a[:20], b[:20])]
    assert alone == together[:20]
    assert [v.detail["annotator"] for v in together] == [DEFAULT_POOL[k].name for k in who]


# Measured on these 400 pairs, seed 0, the default pool, at pool flip rate 0 / 0.2 / 0.4:
# pool 0.9375 / 0.775 / 0.6025; careful 1.0 / 0.81 / 0.6075; verbose 1.0 / 0.7875 / 0.6025;
# first_shown 0.89 / 0.7125 / 0.6225; noisy 0.86 / 0.6875 / 0.54.
def test_agreement_with_gold_falls_as_the_flip_rate_rises():
    prompts, a, b = pairs(400)
    rates = {}
    for flip in (0.0, 0.2, 0.4):
        report = agreement(AnnotatorPool(Gold(), flip_rate=flip), prompts, a, b)
        assert set(report) == {ann.name for ann in DEFAULT_POOL} | {"pool"}
        assert report["pool"].pairs == report["pool"].decided == 400
        rates[flip] = {name: r.rate for name, r in report.items()}
    print("agreement with gold by flip rate:", json.dumps(rates, indent=1))
    for name in rates[0.0]:
        assert rates[0.0][name] > rates[0.2][name] > rates[0.4][name], name
    assert rates[0.0]["careful"] == 1.0  # τ 0.05 on gold gaps of 2+: never wrong
    assert rates[0.0]["careful"] > rates[0.0]["noisy"] and rates[0.0]["careful"] > rates[0.0]["first_shown"]


def test_the_cache_stops_relabelling_and_survives_a_new_pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    prompts, a, b = pairs(30)
    gold = Gold()
    pool = AnnotatorPool(gold, flip_rate=0.25, cache_path=path)
    first = pool.judge(prompts, a, b)
    assert pool.counters() == {"hits": 0, "misses": 30} and gold.scored == 60
    assert pool.cached(prompts, a, b) == [True] * 30
    again = pool.judge(prompts, a, b)
    assert again == first and gold.scored == 60  # 0 new labels
    assert pool.counters() == {"hits": 30, "misses": 30}
    assert len(path.read_text().splitlines()) == 30
    other_gold = Gold()
    reread = AnnotatorPool(other_gold, flip_rate=0.25, cache_path=path)
    assert reread.judge(prompts, a, b) == first and other_gold.scored == 0
    # another flip rate is another labelling: nothing is reused
    assert AnnotatorPool(Gold(), flip_rate=0.3, cache_path=path).cached(prompts, a, b) == [False] * 30


def test_bad_pools_are_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="position_bias"):
        PoolAnnotator("x", position_bias=1.5)
    with pytest.raises(ConfigError, match="flip_rate"):
        AnnotatorPool(Gold(), flip_rate=-0.1)
    with pytest.raises(ConfigError, match="names must differ"):
        AnnotatorPool(Gold(), [PoolAnnotator("x"), PoolAnnotator("x")])
    with pytest.raises(ConfigError, match="at least one"):
        AnnotatorPool(Gold(), [])
