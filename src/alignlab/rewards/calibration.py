"""Reward-model quality: held-out pairwise accuracy, calibration (ECE), reward distribution.

A Bradley-Terry reward model predicts ``P(chosen ≻ rejected) = σ(r_c − r_r)``; a calibrated one
is right 70% of the time on the pairs it gives 0.7. ECE is the binned gap between confidence and
accuracy (Guo et al. 2017, "On calibration of modern neural networks").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pairwise_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> float:
    """Fraction of pairs with ``r_c > r_r``; a tie counts one half."""
    diff = chosen_rewards.float() - rejected_rewards.float()
    if diff.numel() == 0:
        return float("nan")
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def expected_calibration_error(probs: Tensor, outcomes: Tensor, n_bins: int = 10) -> float:
    """``ECE = Σ_b (n_b / N)·|acc_b − conf_b|`` over ``n_bins`` equal-width bins of ``probs``.

    ``probs`` are predicted probabilities that ``outcomes`` (0/1) is 1; a prob of exactly 1
    falls in the last bin.
    """
    probs, outcomes = probs.float().flatten(), outcomes.float().flatten()
    if probs.numel() == 0:
        return float("nan")
    bins = (probs * n_bins).long().clamp(0, n_bins - 1)
    ece = torch.zeros(())
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            gap = (outcomes[in_bin].mean() - probs[in_bin].mean()).abs()
            ece = ece + in_bin.float().mean() * gap
    return float(ece)


def preference_ece(chosen_rewards: Tensor, rejected_rewards: Tensor, n_bins: int = 10) -> float:
    """ECE of ``σ(r_c − r_r)`` as the probability that the chosen completion wins.

    Every pair is counted in both orders, ``(σ(r_c − r_r), 1)`` and ``(σ(r_r − r_c), 0)``, so the
    bins below 0.5 are filled too and a model that is always confidently right has ECE 0.
    """
    p = torch.sigmoid(chosen_rewards.float() - rejected_rewards.float())
    probs = torch.cat([p, 1 - p])
    outcomes = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    return expected_calibration_error(probs, outcomes, n_bins)


def reward_stats(rewards: Tensor, prefix: str) -> dict[str, float]:
    """``{prefix}_mean``, ``_std`` (population), ``_min``, ``_max`` of a reward tensor."""
    r = rewards.float().flatten()
    if r.numel() == 0:
        return {}
    return {f"{prefix}_mean": float(r.mean()), f"{prefix}_std": float(r.std(correction=0)),
            f"{prefix}_min": float(r.min()), f"{prefix}_max": float(r.max())}


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor,
                       n_bins: int = 10) -> dict[str, float]:
    """Accuracy, ECE, mean BT log-loss and the reward distribution of chosen and rejected."""
    diff = chosen_rewards.float() - rejected_rewards.float()
    return {"accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards),
            "ece": preference_ece(chosen_rewards, rejected_rewards, n_bins),
            "bt_loss": float(torch.nn.functional.softplus(-diff).mean()),
            "margin_mean": float(diff.mean()),
            **reward_stats(chosen_rewards, "chosen_reward"),
            **reward_stats(rejected_rewards, "rejected_reward")}


def ensemble_metrics(member_rewards: Tensor, better: Sequence[int], worse: Sequence[int],
                     aggregate: str = "mean", std_coef: float = 1.0,
                     n_bins: int = 10) -> dict[str, float]:
    """:func:`preference_metrics` of the aggregated reward on the pairs ``(better[i], worse[i])``
    of ``member_rewards [N, K]``; for K > 1 also each member's accuracy and the mean spread."""
    from alignlab.rewards.reward_model import aggregate_rewards

    if member_rewards.ndim == 1:
        member_rewards = member_rewards[:, None]
    better, worse = list(better), list(worse)
    agg = aggregate_rewards(member_rewards, aggregate, std_coef)
    metrics = preference_metrics(agg[better], agg[worse], n_bins) if better else {}
    metrics["pairs"] = float(len(better))
    if member_rewards.shape[1] > 1 and better:
        accs = (member_rewards[better] > member_rewards[worse]).float().mean(0)
        metrics.update({f"member_{k}_accuracy": float(a) for k, a in enumerate(accs)})
        metrics["member_std_mean"] = float(member_rewards.std(-1, correction=0).mean())
    return metrics


def score_pairs(scores: Sequence[float], groups: Sequence[int] | None = None
                ) -> tuple[list[int], list[int]]:
    """Indices ``(better, worse)`` of every pair with different scores (within a group if given).

    Turns listwise or scored data into the pairs pairwise accuracy is measured on.
    """
    s = torch.as_tensor(list(scores), dtype=torch.float64)
    wins = s[:, None] > s[None, :]
    if groups is not None:
        g = torch.as_tensor(list(groups))
        wins &= g[:, None] == g[None, :]
    better, worse = wins.nonzero(as_tuple=True)
    return better.tolist(), worse.tolist()


__all__ = ["pairwise_accuracy", "expected_calibration_error", "preference_ece", "reward_stats",
           "preference_metrics", "ensemble_metrics", "score_pairs"]
