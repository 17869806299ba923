"""Held-out metrics of a preference run: the objective's metrics and implicit reward accuracy."""

from __future__ import annotations

from typing import Any

import torch

from alignlab.algorithms.preference.reference import compute_reference_logps
from alignlab.data.preference_batches import collate_groups


def implicit_reward_accuracy(policy: torch.nn.Module, reference: torch.nn.Module,
                             examples: list[dict[str, Any]], pad_token_id: int, *,
                             batch_size: int = 32, device: str = "cpu") -> float:
    """Fraction of pairs with ``π(y_c|x) − ref(y_c|x) > π(y_r|x) − ref(y_r|x)`` (DPO's implicit
    reward ``β·log π/ref`` ranks chosen above rejected; ties count as wrong)."""
    dev = torch.device(device)
    kw = dict(batch_size=batch_size, device=dev, layout="flat")
    pol = compute_reference_logps(policy.to(dev), examples, pad_token_id, **kw)
    ref = compute_reference_logps(reference.to(dev), examples, pad_token_id, **kw)
    wins = [(p[0] - r[0]) > (p[1] - r[1]) for p, r in zip(pol, ref)]
    return sum(wins) / len(wins)


@torch.no_grad()
def heldout_metrics(model: torch.nn.Module, objective: Any, examples: list[dict[str, Any]],
                    pad_token_id: int, *, layout: str, batch_size: int, device: torch.device,
                    precision: str = "fp32") -> dict[str, float]:
    """The objective's loss per item and metrics (``rewards/accuracies``: held-out pairwise
    implicit reward accuracy, ``rewards/margins``, ...) averaged over held-out examples."""
    from alignlab.core.runtime import autocast, to_device

    was_training = model.training
    model.eval()
    state = objective.state_dict()  # evaluation must not move BCO's running shift
    totals: dict[str, float] = {}
    n = 0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = to_device(collate_groups(chunk, pad_token_id, layout=layout), device)
            with autocast(device, precision):
                out = objective.loss(model, batch)
            for k, v in {"loss": float(out.loss_sum) / len(chunk), **out.metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
            n += len(chunk)
    finally:
        model.train(was_training)
        objective.load_state_dict(state)
    return {k: v / n for k, v in totals.items()}
