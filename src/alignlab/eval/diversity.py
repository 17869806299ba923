"""Diversity metrics over a set of completions."""

from __future__ import annotations


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / total n-grams over all texts (word level)."""
    total, seen = 0, set()
    for t in texts:
        words = t.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0
