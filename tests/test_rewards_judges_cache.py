"""The verdict cache: computes each key once, keeps no None, survives a torn last line."""

from __future__ import annotations

from alignlab.rewards.judges import Verdict, VerdictCache
from alignlab.rewards.judges.cache import verdict_key


def test_each_missing_key_is_computed_once_and_none_is_not_kept(tmp_path):
    path = tmp_path / "v.jsonl"
    cache, asked = VerdictCache(path), []

    def compute(idx):  # "k2" is a pair the judge gives no label (index 2 of the first call)
        asked.append(idx)
        return [None if len(asked) > 1 or i == 2 else Verdict(0.9, True, {"i": i}) for i in idx]

    out = cache.lookup(["k0", "k1", "k2", "k0"], compute)
    assert asked == [[0, 1, 2]]  # "k0" twice in one call: computed once
    assert [v is None for v in out] == [False, False, True, False]
    assert cache.counters() == {"hits": 1, "misses": 3} and len(cache) == 2
    cache.lookup(["k2"], compute)  # a None is asked again next time
    assert asked[-1] == [0]
    with path.open("a") as f:
        f.write('{"key": "torn", "p_a": 0.')  # a kill mid-append
    reread = VerdictCache(path)
    assert len(reread) == 2 and "k0" in reread and "torn" not in reread
    assert reread.lookup(["k1"], compute) == [Verdict(0.9, True, {"i": 1})]


def test_the_key_depends_on_the_judge_and_on_the_order_of_the_pair():
    k = verdict_key({"judge": "x"}, "p", "a", "b")
    assert k != verdict_key({"judge": "x"}, "p", "b", "a")
    assert k != verdict_key({"judge": "y"}, "p", "a", "b")
    assert k == verdict_key({"judge": "x"}, "p", "a", "b")
