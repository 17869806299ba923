"""Pairwise judges and text critics (the feedback interfaces beside pointwise rewards).

- ``base.py``: the ``PairwiseJudge`` protocol and ``Verdict``, the adapters from a pointwise
  reward (``RewardJudge``) and a simulated annotator (``AnnotatorJudge``), text critics, and
  ``judge_pairs`` (the one pair-building step).
"""

from alignlab.rewards.judges.base import (
    AnnotatorJudge,
    JudgedPair,
    PairwiseJudge,
    RewardJudge,
    TextCritic,
    ThresholdCritic,
    Verdict,
    judge_pairs,
)

__all__ = ["AnnotatorJudge", "JudgedPair", "PairwiseJudge", "RewardJudge", "TextCritic",
           "ThresholdCritic", "Verdict", "judge_pairs"]
