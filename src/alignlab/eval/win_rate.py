"""Win rates of a policy against a reference policy on the same prompts.

- Gold Bradley-Terry: ``mean_i σ(r(y_i) − r(y_i^ref))``, the policy's and the reference's
  samples paired per prompt (sample j of a prompt against the reference's sample j).
- Annotator (AlpacaFarm, Dubois et al. 2023): the share of pairs a simulated annotator
  (``rewards/annotator.py``: noisy, possibly length-biased) labels for the policy, a tie
  counting one half.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from alignlab.rewards.annotator import SimulatedAnnotator


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def bradley_terry_win_rate(rewards: Sequence[float], ref_rewards: Sequence[float]) -> float:
    """``mean σ(r_i − r_i^ref)`` over paired samples."""
    if len(rewards) != len(ref_rewards) or not rewards:
        raise ValueError(f"win rate needs equal, non-empty lists; got {len(rewards)} and {len(ref_rewards)}")
    return sum(_sigmoid(a - b) for a, b in zip(rewards, ref_rewards)) / len(rewards)


def annotator_win_rate(annotator: SimulatedAnnotator, prompts: Sequence[str],
                       completions: Sequence[str], ref_completions: Sequence[str]) -> float:
    """Share of (policy, reference) pairs the annotator prefers the policy's in (ties: ½)."""
    if not prompts:
        raise ValueError("win rate needs at least one pair")
    labels = annotator.label_pairs(prompts, completions, ref_completions)
    return sum(0.5 if lab.a_preferred is None else float(lab.a_preferred) for lab in labels) / len(labels)
