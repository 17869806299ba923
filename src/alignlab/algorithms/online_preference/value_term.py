"""The objective SELM and VPO share: a paired preference loss on judged pairs plus a term on
the log-ratios log π_θ(y)/π_ref(y) of *calibration* samples y (``losses.online_preference``:
``selm_optimism``, ``vpo_value``).

The calibration samples are either the pairs' own two completions (SELM, whose pairs are
samples of π_ref; offline VPO, whose pairs are the data's) or a sub-batch of other completions
in ``batch["calibration"]`` (online VPO's samples of π_ref), ``k`` per pair. Each pair carries
the mean of its samples' terms, so the units stay pairs (``num_items`` = pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from alignlab.algorithms.online_preference.common import Scorer, batch_tensors
from alignlab.algorithms.preference.trainer import LossPlan, PreferenceObjective
from alignlab.core.runtime import to_device
from alignlab.data.preference_batches import collate_groups
from alignlab.engine.learner import Units
from alignlab.engine.loop import LossOutput
from alignlab.models.logprobs import completion_logprobs


class ValueTermObjective(PreferenceObjective):
    """The preference objective on (y⁺, y⁻) plus ``term(logps, ref_logps)`` on the calibration
    samples, averaged per pair; ``name`` keys its metrics (``loss/<name>``: the term's mean per
    pair, ``calibration/log_ratio``: the mean log π_θ(y) − log π_ref(y) of the calibration samples)."""

    def __init__(self, plan: LossPlan, term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 name: str) -> None:
        super().__init__(plan)
        self.term, self.name = term, name
        self._logps: torch.Tensor | None = None

    def inputs(self, logps: torch.Tensor, ref: torch.Tensor | None, batch: dict[str, Any],
               token_logps: torch.Tensor | None = None) -> Any:
        self._logps = logps  # the pairs' one forward, reused when they are the calibration
        return super().inputs(logps, ref, batch, token_logps)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        out = super().loss(model, batch)
        logps, self._logps = self._logps, None
        calibration = batch.get("calibration")
        if calibration is None:
            (ref,) = batch_tensors(batch, logps.device, "ref_logps")
        else:
            calibration = to_device(calibration, logps.device)
            logps = completion_logprobs(model, calibration)
            (ref,) = batch_tensors(calibration, logps.device, "ref_logps")
        term = self.term(logps, ref)
        per_pair = term.numel() / int(batch["num_groups"])
        out.metrics.update({f"loss/{self.name}": float(term.detach().mean()),
                            "calibration/log_ratio": float((logps - ref).detach().mean())})
        return LossOutput(out.loss_sum + term.sum() / per_pair, out.metrics)


def pairs_with_calibration(scorer: Scorer, pairs: list[dict[str, Any]],
                           calibration: list[list[dict[str, Any]]]) -> Units:
    """Units of ``pairs`` (``collate_groups`` examples with ``ref_logps``), each micro-batch
    with its pairs' calibration completions (``prompt_ids``, ``completion_ids``, ``ref_logps``;
    the same number per pair) collated as ``batch["calibration"]``."""
    def take(idx: torch.Tensor) -> dict[str, Any]:
        rows = idx.tolist()
        batch = collate_groups([pairs[i] for i in rows], scorer.pad, layout=scorer.layout)
        batch["calibration"] = collate_groups([c for i in rows for c in calibration[i]],
                                              scorer.pad, layout=scorer.layout)
        return batch
    return Units(len(pairs), take)


__all__ = ["ValueTermObjective", "pairs_with_calibration"]
