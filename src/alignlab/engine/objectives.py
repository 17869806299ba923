"""Objectives shared by several algorithms (the loop's ``Algorithm`` protocol)."""

from __future__ import annotations

from typing import Any

import torch

from alignlab.engine.loop import LossOutput
from alignlab.models.logprobs import token_logprobs


class NLLObjective:
    """Token-level negative log-likelihood −Σ_t m_t log π(y_t | y_<t) (SFT, pretraining); ``num_items`` is the number of trained tokens."""

    def num_items(self, batch: dict[str, Any]) -> float:
        return float(batch["loss_mask"].sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        lp = token_logprobs(model, batch)
        nll = -lp.sum()
        return LossOutput(nll, {"nll_per_token": nll.item() / max(float(batch["loss_mask"].sum()), 1.0)})
