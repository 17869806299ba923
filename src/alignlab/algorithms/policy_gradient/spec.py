"""The online RL algorithms as data: which advantage, loss, aggregation, KL placement.

Each algorithm is the same controller loop (``engine/controller.py``, hooks in ``algorithm.py``) with different parts from
the registries in ``alignlab.losses``; the policy loss is PPO's clipped surrogate
ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε_low, 1+ε_high)), which at ρ = 1 (one epoch, one
minibatch) is the REINFORCE gradient −A_t ∇log π(y_t).

- ``grpo``: A_i = (r_i − mean_g r)/(std_g r + ε), KL (k3) as a loss term (Shao et al. 2024,
  DeepSeekMath); aggregation grpo|dr_grpo|dapo|bnpo, GSPO sequence ratios
  (``importance: sequence``, Zheng et al. 2025), clip-higher and dynamic sampling (DAPO, Yu et
  al. 2025).
- ``rloo``: A_i = r_i − 1/(k−1) Σ_{j≠i} r_j (Ahmadian et al. 2024), KL in the reward.
- ``remax``: A_i = r(x, y_i) − r(x, ŷ_greedy) (Li et al. 2023), KL in the reward.
- ``reinforce_pp``: token rewards r_t = 1[t=last]·score − β·KL_t, A = whiten over the batch of
  the returns (Hu 2025, REINFORCE++).

With a critic (``ppo.py``, ``critic.py``):

- ``ppo``: token rewards r_t = 1[t=last]·score − β·KL_t (β fixed or adaptive), A = GAE(γ, λ)
  from a learned value model, clipped value loss (Schulman et al. 2017; Ziegler et al. 2019;
  Ouyang et al. 2022, InstructGPT).
- ``nlpo``: ``ppo`` whose policy is restricted to the top-p set of a periodically refreshed copy
  of itself (Ramamurthy et al. 2023, RL4LMs; ``nlpo.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RLAlgorithm:
    name: str
    advantage: str
    """An ``ADVANTAGE_ESTIMATORS`` name."""
    aggregation: str
    """Default ``LOSS_AGGREGATIONS`` mode (``rl.loss_aggregation`` overrides it)."""
    kl_in: str
    """Default KL placement: ``loss`` (a term of the policy loss) or ``reward`` (shaped rewards)."""
    kl_estimator: str
    grouped: bool
    """Advantages are computed within the completions of one prompt (needs ``rollout.n`` ≥ 2)."""
    greedy_baseline: bool = False
    """Also decode one greedy (temperature-0) completion per prompt and score it (ReMax)."""
    token_rewards: bool = False
    """The estimator takes per-token rewards (KL-shaped) rather than one score per sequence."""
    doc: str = ""


RL_ALGORITHMS: dict[str, RLAlgorithm] = {
    "grpo": RLAlgorithm("grpo", "grpo", "grpo", "loss", "k3", grouped=True,
                        doc="GRPO family: group-normalised advantages, KL loss term, "
                            "grpo/dr_grpo/dapo/bnpo aggregation, GSPO, clip-higher, dynamic sampling."),
    "rloo": RLAlgorithm("rloo", "rloo", "token_mean", "reward", "k1", grouped=True,
                        doc="RLOO: leave-one-out baseline over the k completions of a prompt."),
    "remax": RLAlgorithm("remax", "remax", "token_mean", "reward", "k1", grouped=False,
                         greedy_baseline=True,
                         doc="ReMax: the greedy completion's reward as the baseline."),
    "reinforce_pp": RLAlgorithm("reinforce_pp", "reinforce_pp", "token_mean", "reward", "k1",
                                grouped=False, token_rewards=True,
                                doc="REINFORCE++: KL-shaped token rewards, batch-whitened returns."),
    "ppo": RLAlgorithm("ppo", "gae", "token_mean", "reward", "k1", grouped=False,
                       token_rewards=True,
                       doc="PPO: critic + GAE, clipped policy/value losses, fixed/adaptive KL "
                           "in the reward."),
    "nlpo": RLAlgorithm("nlpo", "gae", "token_mean", "reward", "k1", grouped=False,
                        token_rewards=True,
                        doc="NLPO: PPO with a top-p action mask from a refreshed policy copy."),
}
