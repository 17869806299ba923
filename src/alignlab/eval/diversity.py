"""Diversity metrics over a set of completions."""

from __future__ import annotations

import math
from collections import Counter


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / total n-grams over all texts (word level)."""
    total, seen = 0, set()
    for t in texts:
        words = t.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0



def _ngram_counts(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _bleu(c: int, matches: list[int], totals: list[int], r: int, epsilon: float) -> float:
    logs = [math.log((m or epsilon) / t) for m, t in zip(matches, totals)]
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(sum(logs) / len(logs))


def _closest(lengths: list[int], c: int) -> int:
    return min(lengths, key=lambda length: (abs(length - c), length))


def sentence_bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4,
                  epsilon: float = 0.1) -> float:
    """BLEU (Papineni et al. 2002) of one tokenised hypothesis against references:
    ``BP · exp(Σ_n w_n log p_n)``, ``p_n`` the clipped n-gram precision
    ``Σ_g min(c_hyp(g), max_ref c_ref(g)) / Σ_g c_hyp(g)``, ``BP = min(1, exp(1 − r/c))`` with
    ``r`` the reference length closest to ``c = |hyp|`` (the shorter on a tie).

    Orders the hypothesis is too short to have are left out (uniform weights over the rest); a
    precision with no match counts ``epsilon`` matches (Chen & Cherry 2014's method 1, as in
    nltk and Texygen's self-BLEU). An empty hypothesis scores 0."""
    c = len(hypothesis)
    if c == 0 or not references:
        return 0.0
    matches, totals = [], []
    for n in range(1, min(max_n, c) + 1):
        hyp = _ngram_counts(hypothesis, n)
        best: Counter = Counter()
        for ref in references:
            best |= _ngram_counts(ref, n)  # |: each n-gram's largest count over the references
        matches.append(sum(min(k, best[g]) for g, k in hyp.items()))
        totals.append(sum(hyp.values()))
    return _bleu(c, matches, totals, _closest([len(ref) for ref in references], c), epsilon)


def self_bleu(texts: list[str], max_n: int = 4, epsilon: float = 0.1) -> float:
    """Self-BLEU (Zhu et al. 2018, Texygen): the mean over texts of the BLEU (word level,
    :func:`sentence_bleu`) of each against all the others as references; 1 = every text repeats
    the others, lower = more diverse. Fewer than two texts: 0.

    Equal to calling :func:`sentence_bleu` per text, in O(N) counting: the largest count of an
    n-gram among the *other* texts is its overall largest, or the runner-up in the text that
    holds the largest."""
    words = [t.split() for t in texts]
    if len(words) < 2:
        return 0.0
    counts = [[_ngram_counts(w, n) for n in range(1, max_n + 1)] for w in words]
    top: list[dict[tuple, tuple[int, int, int]]] = []  # n-gram -> (largest, its text, runner-up)
    for n in range(max_n):
        best: dict[tuple, tuple[int, int, int]] = {}
        for i, per in enumerate(counts):
            for g, k in per[n].items():
                m1, owner, m2 = best.get(g, (0, -1, 0))
                best[g] = (k, i, m1) if k > m1 else (m1, owner, max(m2, k))
        top.append(best)
    lengths = [len(w) for w in words]
    scores = []
    for i, w in enumerate(words):
        c = len(w)
        if c == 0:
            scores.append(0.0)
            continue
        matches, totals = [], []
        for n in range(min(max_n, c)):
            m = 0
            for g, k in counts[i][n].items():
                m1, owner, m2 = top[n][g]
                m += min(k, m2 if owner == i else m1)
            matches.append(m)
            totals.append(sum(counts[i][n].values()))
        scores.append(_bleu(c, matches, totals, _closest(lengths[:i] + lengths[i + 1:], c), epsilon))
    return sum(scores) / len(scores)
