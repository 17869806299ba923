"""Reward-model losses: pure functions of predicted rewards, one loss per example.

Every entry of ``REWARD_MODEL_LOSSES`` carries ``data_format``, the row format it learns from
(``preference``, ``ranked`` or ``prompt_completion`` with a numeric ``score`` column), and
returns per-example losses ``[B]``; the trainer sums them (and over ensemble heads) and divides
by the number of examples. No model call happens inside a loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlab.core.errors import ConfigError
from alignlab.core.registry import Registry

REWARD_MODEL_LOSSES: Registry = Registry("reward-model loss")

# The fill value of padding items in a ragged list: finite, so no NaN reaches the backward pass,
# and low enough that exp() of it is exactly 0 next to any real reward.
_MASKED = -1e9


def reward_loss(name: str, data_format: str, *, uses_margin: bool = False
                ) -> Callable[[Callable], Callable]:
    """Register a loss under ``name``, learning from rows of ``data_format`` (``uses_margin``:
    it reads the preference rows' ``margin`` column)."""

    def decorator(fn: Callable) -> Callable:
        fn.data_format = data_format  # type: ignore[attr-defined]
        fn.uses_margin = uses_margin  # type: ignore[attr-defined]
        REWARD_MODEL_LOSSES.register(name)(fn)
        return fn

    return decorator


@reward_loss("bradley_terry", "preference")
def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor,
                       margin: Tensor | None = None) -> Tensor:
    """Bradley-Terry pairwise loss ``−log σ(r_c − r_r)`` (``−log σ(r_c − r_r − m)`` with a margin).

    Bradley & Terry (1952), "Rank analysis of incomplete block designs"; as the reward-model loss
    of InstructGPT (Ouyang et al. 2022, "Training language models to follow instructions with
    human feedback"). The trainer passes ``margin`` only to ``bradley_terry_margin``.
    """
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits)


@reward_loss("bradley_terry_margin", "preference", uses_margin=True)
def bradley_terry_margin_loss(chosen_rewards: Tensor, rejected_rewards: Tensor,
                              margin: Tensor | None = None) -> Tensor:
    """Bradley-Terry with a per-pair margin ``−log σ(r_c − r_r − m)`` (rows need ``margin``).

    The margin makes clearly better responses score further apart (Touvron et al. 2023,
    "Llama 2: Open foundation and fine-tuned chat models", §3.2.2).
    """
    if margin is None:
        raise ConfigError("reward.loss 'bradley_terry_margin' needs a 'margin' column in every "
                          "preference row; use 'bradley_terry' for rows without one")
    return bradley_terry_loss(chosen_rewards, rejected_rewards, margin)


@reward_loss("plackett_luce", "ranked")
def plackett_luce_loss(rewards: Tensor, scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Listwise Plackett-Luce NLL: ``−Σ_i [r_π(i) − log Σ_{j≥i} exp r_π(j)]``, π sorting scores down.

    Plackett (1975), "The analysis of permutations"; Luce (1959), "Individual choice behavior";
    the K-wise reward-model loss of Zhu, Jiao & Jordan (2023), "Principled reinforcement learning
    with human feedback from pairwise or K-wise comparisons". ``rewards``/``scores``/``mask`` are ``[B, K]``; ``mask``
    is False on padding items of shorter lists. Tied scores keep their list order. With K = 2
    this is the Bradley-Terry loss.
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    mask = mask.bool()
    # Padding items sort last; a stable sort keeps tied items in list order.
    order = torch.sort(scores.masked_fill(~mask, float("-inf")), dim=-1, descending=True,
                       stable=True).indices
    ranked = rewards.gather(-1, order).masked_fill(~mask.gather(-1, order), _MASKED)
    valid = mask.gather(-1, order)
    # log Σ_{j≥i} exp r_π(j): a log-cumsum-exp over the reversed list.
    tail = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
    return torch.where(valid, tail - ranked, torch.zeros_like(ranked)).sum(-1)


@reward_loss("mse", "prompt_completion")
def mse_loss(rewards: Tensor, targets: Tensor) -> Tensor:
    """Regression on scalar scores: ``(r − s)²`` per completion.

    Absolute ratings as the reward target, as in SteerLM / HelpSteer2 (Wang et al. 2024,
    "HelpSteer2: Open-source dataset for training top-performing reward models").
    """
    return (rewards - targets.to(rewards.dtype)).square()


def centering_penalty(rewards: Tensor, mask: Tensor | None = None, coef: float = 0.0) -> Tensor:
    """Reward centering ``η·(Σ_k r_k)²`` over the items of each example (``η·(r_c + r_r)²`` for a pair).

    Bradley-Terry only fixes reward differences; this pins the free offset near 0 so rewards of
    different models (ensemble members) are comparable. Eisenstein et al. (2023), "Helping or
    herding? Reward model ensembles mitigate but do not eliminate reward hacking".
    ``rewards`` is ``[B, K]``; returns ``[B]``.
    """
    if mask is not None:
        rewards = rewards * mask.to(rewards.dtype)
    return coef * rewards.sum(-1).square()


def preference_model_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of a general pairwise preference model, per ordered pair:
    ``−t·log σ(s) − (1 − t)·log σ(−s)``, ``s = s(x, y₁, y₂)`` its logit that the response shown
    first wins and ``t`` the label (1: y₁ preferred, 0: y₂, ½: a tie).

    The preference model of Munos et al. 2023, "Nash Learning from Human Feedback" (§3),
    trained as the pairwise preference model of Dong et al. 2024, "RLHF Workflow: From Reward
    Modeling to Online RLHF" (there on the label tokens' logits; here a scalar head). The
    trainer puts both orders of every pair in the batch (t and 1 − t). Not in
    ``REWARD_MODEL_LOSSES``: it reads one logit per *pair*, not a reward per response.
    """
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")


def loss_format(name: str) -> str:
    """The row format reward-model loss ``name`` learns from."""
    return REWARD_MODEL_LOSSES.get(name).data_format


__all__ = ["REWARD_MODEL_LOSSES", "bradley_terry_loss", "bradley_terry_margin_loss",
           "plackett_luce_loss", "mse_loss", "centering_penalty", "loss_format",
           "preference_model_bce"]
