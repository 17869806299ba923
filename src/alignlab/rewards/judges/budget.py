"""A labelling budget around any pairwise judge (``judge.max_labels``), so that methods can be
compared at equal feedback cost (issue 12; AlpacaFarm, Dubois et al. 2023, prices methods by
the labels they consume).

A *label* is one pair the wrapped judge has to decide anew. Pairs it has already decided (its
cache, see ``cache.py``; a judge exposes this as ``cached(prompts, a, b) -> list[bool]``) are
free and counted as ``cache_hits``; a judge without a cache pays for every pair (and a cached
judge pays once for a pair that repeats inside one call).

When the budget is spent the wrapper does **not** raise: the pairs it cannot pay for get no
verdict (``None``), which ``judge_pairs`` drops and counts as ``skipped``. A run therefore
continues on what it has (online DPO skips its update when no pair is left) and its metrics
show where the labels ran out (``labels_used`` stops at ``max_labels``). Within a call the
budget goes to the pairs in the order given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignlab.core.errors import ConfigError
from alignlab.rewards.judges.base import PairwiseJudge, Verdict


class BudgetedJudge:
    """``judge`` limited to ``max_labels`` new labels (None: unlimited, still counted)."""

    def __init__(self, judge: PairwiseJudge, max_labels: int | None = None) -> None:
        if max_labels is not None and max_labels < 0:
            raise ConfigError(f"judge.max_labels must be >= 0, got {max_labels}")
        self.inner, self.max_labels = judge, max_labels
        self.labels_used = 0
        """Pairs the inner judge decided anew (cache hits excluded)."""
        self.cache_hits = 0
        """Pairs answered from the inner judge's cache (free)."""
        self.skipped = 0
        """Pairs refused because the budget was spent."""

    @property
    def labels_left(self) -> int | None:
        return None if self.max_labels is None else self.max_labels - self.labels_used

    def judge(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
              ) -> list[Verdict | None]:
        cached_fn = getattr(self.inner, "cached", None)
        cached = list(cached_fn(prompts, a, b)) if cached_fn is not None else [False] * len(prompts)
        take, paid = [], set()
        for i, pair in enumerate(zip(prompts, a, b)):
            if cached[i] or (cached_fn is not None and pair in paid):
                self.cache_hits += 1
            elif self.labels_left is None or self.labels_left > 0:
                self.labels_used += 1
                paid.add(pair)
            else:
                self.skipped += 1
                continue
            take.append(i)
        out: list[Verdict | None] = [None] * len(prompts)
        if take:
            verdicts = self.inner.judge([prompts[i] for i in take], [a[i] for i in take],
                                        [b[i] for i in take])
            for i, v in zip(take, verdicts):
                out[i] = v
        return out

    def counters(self) -> dict[str, Any]:
        """For logging and for a checkpoint (``load_counters`` restores them)."""
        inner = getattr(self.inner, "counters", None)
        return {"labels_used": self.labels_used, "cache_hits": self.cache_hits,
                "skipped": self.skipped, "inner": inner() if inner is not None else None}

    def load_counters(self, state: dict[str, Any]) -> None:
        self.labels_used, self.cache_hits = int(state["labels_used"]), int(state["cache_hits"])
        self.skipped = int(state["skipped"])
        if state.get("inner") is not None and hasattr(self.inner, "load_counters"):
            self.inner.load_counters(state["inner"])


__all__ = ["BudgetedJudge"]
