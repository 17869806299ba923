"""Statistical rejection sampling (RSO): draw preference pairs from the optimal policy.

Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization". Candidates
y ~ π_sft are accepted with probability exp((r(y) − r_max)/β), which turns samples of π_sft into
samples of π*(y) ∝ π_sft(y)·exp(r(y)/β), the policy the DPO/SLiC losses assume their pairs come
from. The accepted completions are then paired and labelled by reward (``build_pairs``), and
trained on with ``sigmoid`` (RSO-sigmoid-norm) or ``hinge`` (RSO-hinge-norm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor


def statistical_rejection_sampling(rewards: Tensor | Sequence[float], beta: float, n_accept: int,
                                   seed: int = 0) -> Tensor:
    """Indices of up to ``n_accept`` accepted candidates, in acceptance order.

    The paper's Algorithm 1: each round, r_max is the best reward still in the pool and every
    remaining candidate is accepted with probability exp((r − r_max)/β) (the best one always is),
    accepted ones leave the pool; rounds repeat until ``n_accept`` are accepted or the pool is
    empty. Small β approaches best-of-N, large β uniform sampling. Within a round candidates are
    visited in a seeded random order (the paper's code walks them in list order, which favours
    early indices when the quota fills mid-round)."""
    if beta <= 0:
        raise ValueError(f"statistical_rejection_sampling: beta must be > 0, got {beta}")
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    gen = torch.Generator().manual_seed(seed)
    pool = torch.arange(r.numel())
    accepted: list[int] = []
    n_accept = min(n_accept, r.numel())
    while len(accepted) < n_accept:
        pool = pool[torch.randperm(pool.numel(), generator=gen)]
        u = torch.rand(pool.numel(), generator=gen, dtype=torch.float64)
        keep = u < torch.exp((r[pool] - r[pool].max()) / beta)
        taken = pool[keep][: n_accept - len(accepted)]
        accepted.extend(taken.tolist())
        pool = pool[~torch.isin(pool, taken)]
    return torch.tensor(accepted, dtype=torch.long)


def build_pairs(rewards: Tensor | Sequence[float], indices: Tensor | Sequence[int] | None = None, *,
                mode: Literal["first_round", "tournament", "all"] = "first_round") -> Tensor:
    """Preference pairs ``[P, 2]`` of (chosen, rejected) candidate indices, labelled by reward.

    From the RSO paper's pair construction: ``first_round`` pairs consecutive accepted samples
    (0,1), (2,3), …; ``tournament`` plays a knock-out bracket where each match is a pair and its
    winner advances (n − 1 pairs, a bye for an odd one out); ``all`` takes every pair. Pairs
    with equal rewards carry no preference and are dropped. The paper labels pairs with a
    pairwise reward-ranking model; here a pointwise reward decides."""
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    idx = list(range(r.numel())) if indices is None else [int(i) for i in indices]
    pairs: list[tuple[int, int]] = []

    def match(i: int, j: int) -> int:
        if r[i] != r[j]:
            pairs.append((i, j) if r[i] > r[j] else (j, i))
        return i if r[i] >= r[j] else j

    if mode == "first_round":
        for k in range(0, len(idx) - 1, 2):
            match(idx[k], idx[k + 1])
    elif mode == "tournament":
        players = idx
        while len(players) > 1:
            winners = [match(players[k], players[k + 1]) for k in range(0, len(players) - 1, 2)]
            players = winners + players[len(players) - len(players) % 2:]
    elif mode == "all":
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                match(idx[a], idx[b])
    else:
        raise ValueError(f"build_pairs: unknown mode {mode!r}; allowed: first_round, tournament, all")
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
