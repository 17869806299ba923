"""Judges and critics: the feedback interfaces beside pointwise rewards (``registry.py``).

- A **pairwise judge** returns, per prompt, ``P(a ≻ b)`` and its choice (``Verdict``). Adapters
  make one from any pointwise reward by Bradley-Terry (``RewardJudge``: the world's gold
  reward, a trained reward model or ensemble, any registered reward) and from a simulated
  annotator (``AnnotatorJudge``: noisy, length-biased, cached labels).
- A **text critic** returns written feedback per completion (``TextCritic``); ``ThresholdCritic``
  writes it from a pointwise reward.
- ``judge_pairs`` is the one pair-building step shared by offline preference data
  (``alignlab data preferences``) and online preference learning: a prompt's samples are paired
  (0, 1), (2, 3), …, identical pairs are dropped (counted), and the judge orders each pair.

A judge may return ``None`` instead of a verdict: *no label* (its labelling budget is spent,
``budget.py``, or it could not read its own output and was told to skip, ``llm.py``).
``judge_pairs`` drops those pairs and counts them as ``skipped``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from alignlab.rewards.annotator import SimulatedAnnotator

PointwiseReward = Callable[[list[str], list[str]], Sequence[float]]


@dataclass(frozen=True)
class Verdict:
    """A judge's view of one pair (a, b)."""

    p_a: float
    """``P(a ≻ b)`` as the judge estimates it."""
    a_preferred: bool | None
    """Its choice; None for a tie."""
    detail: Any = None
    """The judge's own record (the annotator's ``PairLabel``, the two rewards)."""


# float32's rounding: a model judge's σ of one sequence differs by ~1e-7 between two rows of one
# batch where the GEMM blocks rows differently (AVX512 CPUs), so an identical pair is a tie.
TIE_TOLERANCE = 1e-6
"""|P(a ≻ b) − 1/2| at or below which a model judge's verdict is a tie (float rounding of an
exact tie)."""


def swap_debiased_verdict(p_ab: float, p_ba: float | None) -> Verdict:
    """A model judge's verdict from its probability that the first-shown response wins, with a
    shown first (``p_ab``) and, when judged in both orders, b shown first (``p_ba``):
    ``P(a ≻ b) = (p_ab + 1 − p_ba) / 2`` (``p_ab`` alone when ``p_ba`` is None), a tie within
    ``TIE_TOLERANCE`` of ½. Swapping a and b gives exactly ``1 − P``, and a judge that only
    looks at positions says ½."""
    p = p_ab if p_ba is None else (p_ab + 1.0 - p_ba) / 2
    tie = abs(p - 0.5) <= TIE_TOLERANCE
    return Verdict(0.5 if tie else p, None if tie else p > 0.5, {"p_ab": p_ab, "p_ba": p_ba})


@runtime_checkable
class PairwiseJudge(Protocol):
    def judge(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
              ) -> list[Verdict | None]:
        """One verdict per (prompt, a, b), batched; None where the judge gives no label."""
        ...


@runtime_checkable
class TextCritic(Protocol):
    def critique(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        """Written feedback on each completion, batched."""
        ...


class RewardJudge:
    """A pointwise reward as a pairwise judge (Bradley-Terry): P(a ≻ b) = σ((r_a − r_b)/τ); the
    choice is the higher reward, a tie when the rewards are equal."""

    def __init__(self, reward: PointwiseReward, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.reward, self.temperature = reward, temperature

    def judge(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        if not prompts:
            return []
        n = len(prompts)
        r = [float(x) for x in self.reward(list(prompts) * 2, list(a) + list(b))]
        out = []
        for ra, rb in zip(r[:n], r[n:]):
            p = 1.0 / (1.0 + math.exp(-(ra - rb) / self.temperature))
            out.append(Verdict(p, None if ra == rb else ra > rb, (ra, rb)))
        return out


class AnnotatorJudge:
    """A simulated annotator (``annotator.py``) as a pairwise judge: its Bradley-Terry
    probability (before the flip) and its possibly flipped, possibly tied label."""

    def __init__(self, annotator: SimulatedAnnotator) -> None:
        self.annotator = annotator

    def cached(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[bool]:
        return self.annotator.cached_pairs(prompts, a, b)

    def judge(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        if not prompts:
            return []
        return [Verdict(lab.p_a, lab.a_preferred, lab)
                for lab in self.annotator.label_pairs(prompts, a, b)]


class ThresholdCritic:
    """Feedback from a pointwise reward: ``praise`` at or above ``threshold``, else ``advice``,
    each followed by the score (e.g. a sentiment scorer's "make it more positive")."""

    def __init__(self, reward: PointwiseReward, threshold: float, *, praise: str,
                 advice: str) -> None:
        self.reward, self.threshold = reward, threshold
        self.praise, self.advice = praise, advice

    def critique(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        scores = self.reward(list(prompts), list(completions))
        return [f"{self.praise if s >= self.threshold else self.advice} (score {s:.2f})"
                for s in scores]


@dataclass(frozen=True)
class JudgedPair:
    """One judged pair of a prompt's samples: ``group``/``a``/``b`` index the prompt and two of
    its samples; ``chosen``/``rejected`` are a/b as the verdict orders them (a first on a tie)."""

    group: int
    a: int
    b: int
    verdict: Verdict

    @property
    def chosen(self) -> int:
        return self.b if self.verdict.a_preferred is False else self.a

    @property
    def rejected(self) -> int:
        return self.a if self.verdict.a_preferred is False else self.b


def judge_pairs(prompts: Sequence[str], groups: Sequence[Sequence[str]], judge: PairwiseJudge,
                *, limit: int | None = None, counts: Counter | None = None) -> list[JudgedPair]:
    """Pair each prompt's samples (0, 1), (2, 3), … and judge every pair in one call.

    Pairs of identical samples carry no preference: they are dropped and counted in
    ``counts["dropped_identical"]``; at most ``limit`` pairs are judged. Pairs the judge gives
    no label (a None verdict) are dropped and counted in ``counts["skipped"]``."""
    counts = counts if counts is not None else Counter()
    todo: list[tuple[int, int, int]] = []
    for g, samples in enumerate(groups):
        for j in range(0, len(samples) - 1, 2):
            if samples[j] == samples[j + 1]:
                counts["dropped_identical"] += 1
            else:
                todo.append((g, j, j + 1))
    todo = todo[:limit] if limit is not None else todo
    if not todo:
        return []
    verdicts = judge.judge([prompts[g] for g, _, _ in todo], [groups[g][a] for g, a, _ in todo],
                           [groups[g][b] for g, _, b in todo])
    if skipped := sum(v is None for v in verdicts):
        counts["skipped"] += skipped
    return [JudgedPair(g, a, b, v) for (g, a, b), v in zip(todo, verdicts) if v is not None]
