"""Advantage estimators for online RL: rewards (+ values) → per-token advantages.

Every estimator in ``ADVANTAGE_ESTIMATORS`` takes keyword arguments only, drawn from one shared
set of rollout tensors plus its own hyper-parameters, and returns ``(advantages, returns)``:

- ``mask [B,T]``: 1 on completion tokens (right-padded; prompt tokens may precede them);
- ``scores [B]``: one reward per sequence, or ``rewards [B,T]``: per-token rewards (a sequence
  estimator given ``rewards`` uses their masked sum as the score);
- ``values [B,T]`` (gae), ``group_ids [B]`` or ``group_size`` (grpo, rloo),
  ``baseline_scores [B]`` (remax);
- ``advantages [B,T]`` are 0 outside ``mask``; ``returns [B,T]`` or None where the method has none.

So a trainer can call ``ADVANTAGE_ESTIMATORS.get(name)(mask=..., scores=..., **hparams)``.
Inputs are treated as constants: everything here runs under ``torch.no_grad``.
Batches are padded ``[B,T]`` (one sequence per row), not packed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignlab.core.errors import ConfigError
from alignlab.core.registry import Registry
from alignlab.losses.kl import token_kl

ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")


# ---------------------------------------------------------------------------- masked statistics

def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·mask over ``dim`` (all elements if None)."""
    xm = x * mask.to(x.dtype)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·mask / Σ mask over ``dim``; 0 where the mask is empty."""
    m = mask.to(x.dtype)
    total = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / total.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked elements of ``x`` (Bessel-corrected if ``unbiased``)."""
    m = mask.to(x.dtype)
    n = m.sum()
    var = masked_mean((x - masked_mean(x, m)).square(), m)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / sqrt(var + eps) over the masked elements; 0 outside the mask.

    ``shift_mean=False`` only rescales (keeps the sign of every element).
    """
    m = mask.to(x.dtype)
    mean, var = masked_mean(x, m), masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# ---------------------------------------------------------------------------- shared plumbing

def _broadcast(per_sequence: Tensor, mask: Tensor) -> Tensor:
    """[B] → [B,T] on the completion tokens, 0 elsewhere."""
    return per_sequence[:, None].to(torch.float32) * mask.to(torch.float32)


def _sequence_scores(scores: Tensor | None, rewards: Tensor | None, mask: Tensor,
                     estimator: str) -> Tensor:
    if scores is not None:
        if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
            raise ValueError(f"{estimator}: scores must have shape [B]={mask.shape[0]}, "
                             f"got {tuple(scores.shape)}")
        return scores.to(torch.float32)
    if rewards is not None:
        return masked_sum(rewards.to(torch.float32), mask, dim=-1)
    raise ValueError(f"{estimator}: pass scores [B] or rewards [B,T]")


def _token_rewards(scores: Tensor | None, rewards: Tensor | None, mask: Tensor,
                   estimator: str) -> Tensor:
    if rewards is not None:
        if rewards.shape != mask.shape:
            raise ValueError(f"{estimator}: rewards must have the shape of mask "
                             f"{tuple(mask.shape)}, got {tuple(rewards.shape)}")
        return rewards.to(torch.float32) * mask.to(torch.float32)
    if scores is not None:
        return scores_to_token_rewards(scores, mask)
    raise ValueError(f"{estimator}: pass rewards [B,T] or scores [B]")


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of ``mask`` (0 for an all-zero row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=-1)


def scores_to_token_rewards(scores: Tensor, mask: Tensor, dense: Tensor | None = None) -> Tensor:
    """Put each sequence score on its last completion token; rows with no token get nothing.

    ``dense [B,T]``: per-token reward components already included in ``scores``; they stay
    at their tokens and only the rest, ``score − Σ_t dense_t``, goes on the last token."""
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    has_tokens = mask.bool().any(dim=-1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    if dense is not None:
        dense = dense.to(device=mask.device, dtype=torch.float32)
        scores = scores.to(torch.float32) - dense.sum(-1)
    rewards[rows, last_token_index(mask)] = scores.to(torch.float32) * has_tokens
    return rewards if dense is None else rewards + dense


def _group_index(n: int, group_ids: Tensor | None, group_size: int | None,
                 estimator: str) -> tuple[Tensor, int]:
    """(inverse [B] in 0..G−1, G) from explicit ids or contiguous groups of ``group_size``."""
    if group_ids is not None:
        _, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse, int(inverse.max()) + 1 if n else 0
    if group_size is None:
        raise ValueError(f"{estimator}: pass group_ids [B] or group_size")
    if group_size < 1 or n % group_size:
        raise ConfigError(f"{estimator}: the batch of {n} completions is not a whole number of "
                          f"groups of group_size={group_size}")
    return torch.arange(n) // group_size, n // group_size


def _group_stats(scores: Tensor, inverse: Tensor, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-element group (sum, count, unbiased std; std = 0 for groups of one)."""
    inverse = inverse.to(scores.device)
    sums = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, inverse, scores)
    counts = torch.bincount(inverse, minlength=n_groups).to(scores.dtype)
    mean = (sums / counts)[inverse]
    sq = torch.zeros_like(sums).index_add_(0, inverse, (scores - mean).square())
    std = (sq / (counts - 1).clamp(min=1.0)).sqrt()
    return sums[inverse], counts[inverse], std[inverse]


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = Σ_{s≥t, mask_s=1} γ^{(# masked steps from t to s)} r_s; 0 outside the mask.

    Positions where ``mask`` is 0 are skipped (not treated as episode ends), so prompt prefixes,
    right padding and masked-out tool outputs inside a completion are all handled.
    """
    m = mask.to(torch.float32)
    returns = torch.zeros_like(m)
    running = torch.zeros(m.shape[0], dtype=torch.float32, device=m.device)
    for t in reversed(range(m.shape[-1])):
        g = rewards[:, t] + gamma * running
        returns[:, t] = g * m[:, t]
        running = torch.where(m[:, t].bool(), g, running)
    return returns


# ---------------------------------------------------------------------------- estimators

@ADVANTAGE_ESTIMATORS.register("gae")
@torch.no_grad()
def gae(*, mask: Tensor, values: Tensor | None = None, rewards: Tensor | None = None,
        scores: Tensor | None = None, gamma: float = 1.0, lam: float = 0.95,
        **unused: Tensor | None) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: A_t = δ_t + γλ A_{t+1}, as used by PPO.

    Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE".
    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1},  returns R_t = A_t + V_t; V = 0 and
    A = 0 after the last completion token. Positions where ``mask`` is 0 are skipped.
    """
    _check_unused("gae", unused)
    if values is None:
        raise ValueError("gae: pass values [B,T] (the critic's estimates)")
    r = _token_rewards(scores, rewards, mask, "gae")
    v = values.to(torch.float32)
    m = mask.to(torch.float32)
    advantages = torch.zeros_like(m)
    next_value = torch.zeros(m.shape[0], dtype=torch.float32, device=m.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(m.shape[-1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = adv_t * m[:, t]
        on = m[:, t].bool()
        next_value = torch.where(on, v[:, t], next_value)
        next_adv = torch.where(on, adv_t, next_adv)
    return advantages, (advantages + v) * m


@ADVANTAGE_ESTIMATORS.register("grpo")
@torch.no_grad()
def grpo(*, mask: Tensor, scores: Tensor | None = None, rewards: Tensor | None = None,
         group_ids: Tensor | None = None, group_size: int | None = None,
         scale_rewards: str | bool = "group", eps: float = 1e-4,
         **unused: Tensor | None) -> tuple[Tensor, None]:
    """GRPO group-relative advantage: A_i = (r_i − mean_g r) / (std_g r + eps).

    Shao et al. 2024, "DeepSeekMath" (g: the completions of the same prompt).
    ``scale_rewards``: "group" (std of the prompt's group, unbiased), "batch" (std of all scores
    in the batch, as TRL), or "none": A_i = r_i − mean_g r, the unscaled Dr. GRPO variant (Liu et
    al. 2025, "Understanding R1-Zero-Like Training"). True/False mean "group"/"none". Groups of
    one completion get advantage 0.
    """
    _check_unused("grpo", unused)
    s = _sequence_scores(scores, rewards, mask, "grpo")
    inverse, n_groups = _group_index(s.shape[0], group_ids, group_size, "grpo")
    sums, counts, group_std = _group_stats(s, inverse, n_groups)
    centred = s - sums / counts
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # type: ignore
    if mode == "group":
        centred = centred / (group_std + eps)
    elif mode == "batch":
        batch_std = s.std() if s.numel() > 1 else s.new_zeros(())
        centred = centred / (batch_std + eps)
    elif mode != "none":
        raise ConfigError(f"grpo: unknown scale_rewards {scale_rewards!r}; "
                          "allowed values: group, batch, none")
    return _broadcast(centred, mask), None


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo(**kwargs: object) -> tuple[Tensor, None]:
    """Dr. GRPO advantage: A_i = r_i − mean_g r, i.e. grpo with scale_rewards="none".

    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective".
    """
    return grpo(**kwargs, scale_rewards="none")  # type: ignore[arg-type]


@ADVANTAGE_ESTIMATORS.register("rloo")
@torch.no_grad()
def rloo(*, mask: Tensor, scores: Tensor | None = None, rewards: Tensor | None = None,
         group_ids: Tensor | None = None, group_size: int | None = None,
         **unused: Tensor | None) -> tuple[Tensor, None]:
    """RLOO leave-one-out baseline: A_i = r_i − 1/(k−1) Σ_{j≠i} r_j (k ≥ 2 per prompt).

    Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al. 2024,
    "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback".
    """
    _check_unused("rloo", unused)
    s = _sequence_scores(scores, rewards, mask, "rloo")
    inverse, n_groups = _group_index(s.shape[0], group_ids, group_size, "rloo")
    sums, counts, _ = _group_stats(s, inverse, n_groups)
    if bool((counts < 2).any()):
        raise ConfigError("rloo needs at least 2 completions per prompt for a leave-one-out "
                          "baseline; raise the number of completions per prompt")
    baseline = (sums - s) / (counts - 1)
    return _broadcast(s - baseline, mask), None


@ADVANTAGE_ESTIMATORS.register("remax")
@torch.no_grad()
def remax(*, mask: Tensor, baseline_scores: Tensor | None = None, scores: Tensor | None = None,
          rewards: Tensor | None = None, **unused: Tensor | None) -> tuple[Tensor, None]:
    """ReMax: A = r(x, y) − r(x, ŷ_greedy), the greedy completion's reward as the baseline.

    Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
    Aligning LLMs". ``baseline_scores [B]`` are the rewards of the greedy completions.
    """
    _check_unused("remax", unused)
    if baseline_scores is None:
        raise ValueError("remax: pass baseline_scores [B] (rewards of the greedy completions)")
    s = _sequence_scores(scores, rewards, mask, "remax")
    return _broadcast(s - baseline_scores.to(s), mask), None


@ADVANTAGE_ESTIMATORS.register("reinforce_pp", "reinforce++")
@torch.no_grad()
def reinforce_pp(*, mask: Tensor, rewards: Tensor | None = None, scores: Tensor | None = None,
                 gamma: float = 1.0, eps: float = 1e-8,
                 **unused: Tensor | None) -> tuple[Tensor, Tensor]:
    """REINFORCE++: A = whiten_batch(G), G_t = Σ_{s≥t} γ^{s−t} r_s of KL-shaped token rewards.

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models".
    r_t = 1[t = last]·score − β·KL_t (build with ``kl_shaped_rewards``); the mean and std are
    over all completion tokens of the batch, so call it on the whole rollout batch, not on
    micro-batches.
    """
    _check_unused("reinforce_pp", unused)
    returns = discounted_returns(_token_rewards(scores, rewards, mask, "reinforce_pp"), mask,
                                 gamma)
    return whiten(returns, mask, eps=eps), returns


@ADVANTAGE_ESTIMATORS.register("reinforce")
@torch.no_grad()
def reinforce(*, mask: Tensor, scores: Tensor | None = None, rewards: Tensor | None = None,
              baseline: bool = False, **unused: Tensor | None) -> tuple[Tensor, None]:
    """REINFORCE (Williams 1992): A = r, or A = r − mean_batch r with ``baseline=True``."""
    _check_unused("reinforce", unused)
    s = _sequence_scores(scores, rewards, mask, "reinforce")
    if baseline:
        s = s - s.mean()
    return _broadcast(s, mask), None


# Rollout tensors an estimator may be handed although it does not use them (so one call site
# serves every estimator); anything else is a misspelt hyper-parameter and is an error.
_ROLLOUT_KEYS = frozenset({"scores", "rewards", "values", "group_ids", "group_size",
                           "baseline_scores", "logprobs", "ref_logprobs"})


def _check_unused(estimator: str, unused: dict) -> None:
    unknown = sorted(set(unused) - _ROLLOUT_KEYS)
    if unknown:
        raise ConfigError(f"advantage estimator {estimator!r} got unknown argument(s) "
                          f"{', '.join(unknown)}")


# ---------------------------------------------------------------------------- KL in the reward

@torch.no_grad()
def kl_shaped_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                      kl_coef: float, estimator: str = "k1",
                      dense: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """KL-in-reward shaping: r_t = 1[t = last]·score − β·KL_t.

    InstructGPT (Ouyang et al. 2022), after Ziegler et al. 2019. KL_t is the per-token estimate
    (``alignlab.losses.kl``) of log π(y_t) − log π_ref(y_t).
    Returns ``(rewards [B,T], kl [B,T])``, both 0 outside ``mask``; ``kl`` is for logging and
    for the KL controller (``kl.sum(-1).mean()`` is the batch's mean sequence KL). ``dense``:
    per-token reward components inside ``scores`` (see :func:`scores_to_token_rewards`).
    """
    kl = token_kl(logprobs.float(), ref_logprobs.float(), estimator, mask)
    return scores_to_token_rewards(scores, mask, dense) - kl_coef * kl, kl


class FixedKLController:
    """A constant KL coefficient β (InstructGPT, Ouyang et al. 2022)."""

    def __init__(self, kl_coef: float) -> None:
        self.kl_coef = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.kl_coef

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl_coef = float(state["kl_coef"])


class AdaptiveKLController(FixedKLController):
    """Adaptive β (Ziegler et al. 2019, used by RL4LMs, Ramamurthy et al. 2023).

    e = clip(KL / target − 1, −0.2, 0.2);  β ← β · (1 + e · n_steps / horizon).
    ``current_kl`` is the mean per-sequence KL of the batch; ``n_steps`` the samples it covered.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ConfigError("AdaptiveKLController: target and horizon must be > 0 "
                              f"(got target={target}, horizon={horizon})")
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + error * n_steps / self.horizon
        return self.kl_coef
