"""Held-out evaluation of a trained reward model or ensemble: accuracy, calibration, agreement."""

from __future__ import annotations

from typing import Any

import torch

from alignlab.algorithms.reward_model.batches import collate, example_rewards
from alignlab.core.runtime import to_device
from alignlab.rewards.calibration import ensemble_metrics, score_pairs
from alignlab.rewards.reward_model import aggregate_rewards


@torch.no_grad()
def evaluate_reward_model(ensemble: Any, examples: list[dict], fmt: str, pad_token_id: int, *,
                          batch_size: int = 64, n_bins: int = 10) -> dict[str, float]:
    """Held-out metrics of a reward ensemble on tokenised ``fmt`` examples (see
    :mod:`alignlab.algorithms.reward_model.trainer`): pairs are chosen/rejected, or items of a list (or rows)
    with different scores; ``prompt_completion`` rows also give the ``mse`` to their targets."""
    device = next(ensemble.parameters()).device
    was_training = ensemble.training
    ensemble.eval()
    items, scores, groups = [], [], []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = to_device(collate(chunk, fmt, pad_token_id), device)
            per_item = example_rewards(ensemble.member_rewards(batch).float(), batch, fmt).cpu()
            if fmt == "ranked":  # flatten the lists back to their real items
                mask = batch["item_mask"].cpu()
                items.append(per_item[mask])
                scores += batch["scores"].cpu()[mask].tolist()
                groups += mask.nonzero()[:, 0].add(start).tolist()
            else:
                items.append(per_item.reshape(-1, per_item.shape[-1]))
    finally:
        ensemble.train(was_training)
    member = torch.cat(items)  # [N, K]
    if fmt == "preference":  # rows alternate chosen, rejected
        better, worse = list(range(0, len(member), 2)), list(range(1, len(member), 2))
    elif fmt == "ranked":
        better, worse = score_pairs(scores, groups)
    else:
        targets = torch.tensor([e["target"] for e in examples])
        better, worse = score_pairs(targets.tolist())
    metrics = ensemble_metrics(member, better, worse, ensemble.aggregate, ensemble.std_coef,
                               n_bins)
    if fmt == "prompt_completion":
        agg = aggregate_rewards(member, ensemble.aggregate, ensemble.std_coef)
        metrics["mse"] = float((agg - targets).square().mean())
    return metrics
