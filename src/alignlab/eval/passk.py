"""pass@k on verifiable tasks: the unbiased estimator of Chen et al. 2021 ("Evaluating Large
Language Models Trained on Code", Codex)."""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """``1 − C(n−c, k) / C(n, k)``: the probability that at least one of ``k`` completions drawn
    without replacement from ``n`` samples, ``c`` of them correct, is correct; computed as the
    paper's stable product ``1 − Π_{i=n−c+1}^{n} (1 − k/i)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; ``correct[j]`` holds the verdicts of problem j's samples."""
    if not correct:
        raise ValueError("pass@k needs at least one problem")
    return sum(pass_at_k(len(c), sum(map(bool, c)), k) for c in correct) / len(correct)
