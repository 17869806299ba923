"""Pairs of a prompt's own samples (y₁, y₂), shared by INPO, DNO and EGPO: which samples pair up,
their micro-batches (y₁ and y₂ in the two slots of ``collate_groups``) and their log-probs as
``[pairs, 2]``.

The slot names ``chosen_ids``/``rejected_ids`` are ``collate_groups``' names for a pair's two
completions, not a preference order: each term reads the preference from its own inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from alignlab.algorithms.online_preference.common import TIE, Labeller, by_prompt, sample_ids
from alignlab.engine.loop import LossOutput
from alignlab.models.logprobs import completion_logprobs
from alignlab.rewards.judges import Verdict
from alignlab.rollout.role import Rollouts

Pair = tuple[int, int]


def adjacent_pairs(rollouts: Rollouts) -> list[Pair]:
    """(0, 1), (2, 3), … of each prompt's samples: independent draws from the sampling policy."""
    return [(g[j], g[j + 1]) for g in by_prompt(rollouts) for j in range(0, len(g) - 1, 2)]


def all_pairs(rollouts: Rollouts) -> list[Pair]:
    """Every (i, j), i < j, of each prompt's samples."""
    return [(g[i], g[j]) for g in by_prompt(rollouts)
            for i in range(len(g)) for j in range(i + 1, len(g))]


def judge_pairs(labeller: Labeller, rollouts: Rollouts, pairs: Sequence[Pair],
                metrics: dict[str, float] | None) -> list[tuple[Pair, Verdict]]:
    """One verdict per pair; identical pairs (ties for free) and pairs left unlabelled dropped."""
    verdicts = labeller.verdicts([rollouts.prompts[a] for a, _ in pairs],
                                 [rollouts.completions[a] for a, _ in pairs],
                                 [rollouts.completions[b] for _, b in pairs], metrics)
    return [(ab, v) for ab, v in zip(pairs, verdicts) if v is not None and v is not TIE]


def pair_examples(rollouts: Rollouts, pairs: Sequence[Pair], eos: int) -> list[dict[str, Any]]:
    """``collate_groups`` examples with y₁ in slot 0 and y₂ in slot 1."""
    return [{"prompt_ids": list(rollouts.prompt_ids[a]), "chosen_ids": sample_ids(rollouts, a, eos),
             "rejected_ids": sample_ids(rollouts, b, eos)} for a, b in pairs]


def as_pairs(flat: torch.Tensor, pairs: Sequence[Pair] | int) -> torch.Tensor:
    """Slot-major values ``[2B]`` (all y₁, then all y₂) as ``[B, 2]``."""
    b = pairs if isinstance(pairs, int) else len(pairs)
    return torch.stack([flat[:b], flat[b:]], dim=1)


def of_pairs(values: torch.Tensor, pairs: Sequence[Pair]) -> torch.Tensor:
    """Per-sample ``values`` ``[N]`` gathered as ``[B, 2]`` for the pairs."""
    return torch.stack([values[[a for a, _ in pairs]], values[[b for _, b in pairs]]], dim=1)


def pair_logps(score: Callable[[Rollouts, Sequence[int]], torch.Tensor], rollouts: Rollouts,
               pairs: Sequence[Pair]) -> torch.Tensor:
    """``[B, 2]`` log-probs of the pairs' samples under ``score`` (one pass over both slots)."""
    return as_pairs(score(rollouts, [a for a, _ in pairs] + [b for _, b in pairs]), pairs)


class PairObjective(ABC):
    """Σ of a per-pair term over a micro-batch of pairs; ``num_items`` = pairs. ``terms`` gets
    the policy's ``[B, 2]`` log-probs and the batch's ``inputs`` (row-aligned tensors, on the
    log-probs' device) and returns the per-pair losses and the metrics."""

    inputs: tuple[str, ...] = ()

    def num_items(self, batch: dict[str, Any]) -> float:
        return float(batch["num_groups"])

    @abstractmethod
    def terms(self, logps: torch.Tensor, **inputs: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, float]]:
        """The per-pair losses ``[B]`` and the metrics (each method's own term)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        logps = as_pairs(completion_logprobs(model, batch), int(batch["num_groups"]))
        losses, metrics = self.terms(logps, **{k: batch[k].to(logps.device) for k in self.inputs})
        return LossOutput(losses.sum(), metrics)


__all__ = ["Pair", "PairObjective", "adjacent_pairs", "all_pairs", "as_pairs", "judge_pairs",
           "of_pairs", "pair_examples", "pair_logps"]
