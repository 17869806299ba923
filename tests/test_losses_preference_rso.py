"""Statistical rejection sampling and pair construction (RSO)."""

import torch

from alignlab.rewards.rso import build_pairs, statistical_rejection_sampling


def test_seeded_and_distinct():
    rewards = torch.linspace(0, 1, 16)
    first = statistical_rejection_sampling(rewards, beta=0.5, n_accept=6, seed=3)
    assert torch.equal(first, statistical_rejection_sampling(rewards, beta=0.5, n_accept=6, seed=3))
    assert len(set(first.tolist())) == 6
    runs = {tuple(statistical_rejection_sampling(rewards, 0.5, 6, seed=s).tolist()) for s in range(5)}
    assert len(runs) > 1


def test_acceptance_favours_high_reward():
    rewards = torch.linspace(0, 1, 20)
    counts = torch.zeros(20)
    for seed in range(100):
        counts[statistical_rejection_sampling(rewards, beta=0.1, n_accept=4, seed=seed)] += 1
    assert counts[-5:].sum() > 3 * counts[:5].sum()
    assert counts[-1] == counts.max()


def test_beta_limits():
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.5])
    for seed in range(5):  # tiny β: best-of-N
        assert statistical_rejection_sampling(rewards, 1e-6, 1, seed=seed).tolist() == [1]
    assert sorted(statistical_rejection_sampling(rewards, 0.1, 10, seed=0).tolist()) == [0, 1, 2, 3]


def test_build_pairs_modes():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.7])
    # (0, 1) → 1 beats 0; (2, 3) is a tie and carries no preference
    assert build_pairs(rewards, [0, 1, 2, 3], mode="first_round").tolist() == [[1, 0]]
    tournament = build_pairs(rewards, mode="tournament")
    for chosen, rejected in tournament.tolist():
        assert rewards[chosen] > rewards[rejected]
    assert tournament.shape == (3, 2)  # 4 matches for 5 players, one of them a tie
    assert build_pairs(rewards, mode="all").shape == (9, 2)  # C(5, 2) = 10 minus the tie
    assert build_pairs(rewards, [4], mode="all").shape == (0, 2)
