"""Pairwise judges and text critics (the feedback interfaces beside pointwise rewards).

- ``base.py``: the ``PairwiseJudge`` protocol and ``Verdict``, the adapters from a pointwise
  reward (``RewardJudge``) and a simulated annotator (``AnnotatorJudge``), text critics, and
  ``judge_pairs`` (the one pair-building step);
- ``llm.py``: an LLM as the judge (``LLMJudge``, Zheng et al. 2023);
- ``preference_model.py``: a trained general pairwise preference model as the judge
  (``PreferenceModelJudge``; the model: ``rewards/preference_model.py``);
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
    swap_debiased_verdict,
)
from alignlab.rewards.judges.budget import BudgetedJudge
from alignlab.rewards.judges.cache import VerdictCache
from alignlab.rewards.judges.llm import DEFAULT_TEMPLATE, JudgeParseError, JudgeTemplate, LLMJudge
from alignlab.rewards.judges.preference_model import PreferenceModelJudge

__all__ = ["AnnotatorJudge", "BudgetedJudge", "DEFAULT_TEMPLATE", "JudgeParseError",
           "JudgeTemplate", "JudgedPair", "LLMJudge", "PairwiseJudge", "PreferenceModelJudge",
           "RewardJudge", "TextCritic", "ThresholdCritic", "Verdict", "VerdictCache",
           "judge_pairs", "swap_debiased_verdict"]
