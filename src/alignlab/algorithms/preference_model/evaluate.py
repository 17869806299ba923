"""Held-out evaluation of a pairwise preference model: how often its position-swap averaged
``P(chosen ≻ rejected)`` picks the chosen response, its log-loss, and how much it cares which
response is shown first."""

from __future__ import annotations

from typing import Any

import torch

from alignlab.rewards.preference_model import PairwisePreferenceModel, first_wins, swap_average


def evaluate_preference_model(model: PairwisePreferenceModel, examples: list[dict[str, Any]],
                              pad_token_id: int, *, batch_size: int = 64) -> dict[str, float]:
    """Metrics on joined pair examples (``ab``: chosen shown first, ``ba``: rejected first,
    ``target`` 1, or ½ for a tie):

    - ``accuracy``: over decided pairs, the share with P(chosen ≻ rejected) > ½ (½ counts half);
    - ``log_loss``: over decided pairs, mean −log P(chosen ≻ rejected);
    - ``p_chosen_mean``: over decided pairs, mean P(chosen ≻ rejected);
    - ``swap_agreement``: the share of pairs whose two orders pick the same response;
    - ``position_bias``: mean over pairs of (P_first(chosen, rejected) + P_first(rejected,
      chosen))/2 − ½, the lean towards the response shown first (0: none);
    - ``pairs``, ``ties``; with ties, ``tie_abs_error``: mean |P − ½| on tied pairs.
    """
    sequences = [s for e in examples for s in (e["ab"], e["ba"])]
    p = first_wins(model, sequences, pad_token_id, batch_size)
    p_ab, p_ba = p[0::2], p[1::2]
    avg = swap_average(p_ab, p_ba)
    tie = torch.tensor([e["target"] == 0.5 for e in examples], dtype=torch.bool)
    decided = avg[~tie]
    metrics: dict[str, float] = {
        "pairs": float((~tie).sum()), "ties": float(tie.sum()),
        "swap_agreement": float(((p_ab > 0.5) == (p_ba < 0.5)).float().mean()),
        "position_bias": float(((p_ab + p_ba) / 2 - 0.5).mean()),
    }
    if len(decided):
        wins = (decided > 0.5).float() + 0.5 * (decided == 0.5).float()
        metrics.update({"accuracy": float(wins.mean()),
                        "log_loss": float(-decided.clamp_min(1e-12).log().mean()),
                        "p_chosen_mean": float(decided.mean())})
    if tie.any():
        metrics["tie_abs_error"] = float((avg[tie] - 0.5).abs().mean())
    return metrics


__all__ = ["evaluate_preference_model"]
