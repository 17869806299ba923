"""Pairwise judges and text critics (the feedback interfaces beside pointwise rewards).

- ``base.py``: the ``PairwiseJudge`` protocol and ``Verdict``, the adapters from a pointwise
  reward (``RewardJudge``) and a simulated annotator (``AnnotatorJudge``), text critics, and
  ``judge_pairs`` (the one pair-building step);
- ``llm.py``: an LLM as the judge (``LLMJudge``, Zheng et al. 2023);
- ``cache.py``: the on-disk verdict cache (JSONL) of the judges that are costly or random;
- ``budget.py``: a labelling budget around any judge (``BudgetedJudge``).

The annotator pool (AlpacaFarm) lives beside the single annotator: ``rewards/annotator_pool.py``.
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
from alignlab.rewards.judges.budget import BudgetedJudge
from alignlab.rewards.judges.cache import VerdictCache
from alignlab.rewards.judges.llm import DEFAULT_TEMPLATE, JudgeParseError, JudgeTemplate, LLMJudge

__all__ = ["AnnotatorJudge", "BudgetedJudge", "DEFAULT_TEMPLATE", "JudgeParseError",
           "JudgeTemplate", "JudgedPair", "LLMJudge", "PairwiseJudge", "RewardJudge",
           "TextCritic", "ThresholdCritic", "Verdict", "VerdictCache", "judge_pairs"]
