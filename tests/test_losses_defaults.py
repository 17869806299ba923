"""The default hyper-parameters of every registered loss and estimator, pinned: they are the
documented public behaviour (a paper's or TRL's value, named in each docstring), so changing one
must be a deliberate edit here, not an accident."""

from __future__ import annotations

import inspect

import pytest

from alignlab.losses.advantages import ADVANTAGE_ESTIMATORS
from alignlab.losses.policy import POLICY_LOSSES
from alignlab.losses.preference import PREFERENCE_LOSSES, loss_spec
from alignlab.losses.rollout_correction import RolloutCorrection
from alignlab.losses.value import VALUE_LOSSES

PREFERENCE_DEFAULTS = {
    "alphapo": {"beta": 2.5, "gamma": 0.1, "alpha": 0.25},
    "aot_unpaired_on_pairs": {"beta": 0.1, "label_smoothing": 0.0},
    "aot_paired": {"beta": 0.1, "label_smoothing": 0.0},
    "aot_unpaired": {"beta": 0.1, "label_smoothing": 0.0},
    "apo_down": {"beta": 0.1},
    "apo_zero": {"beta": 0.1},
    "apo_zero_unpaired": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "bco": {"beta": 0.1, "reward_shift": 0.0},
    "bco_pair": {"beta": 0.1, "reward_shift": 0.0},
    "cdpo": {"beta": 0.1, "label_smoothing": 0.1},
    "cpo": {"beta": 0.1, "alpha": 1.0, "label_smoothing": 0.0},
    "discopop": {"beta": 0.05, "tau": 0.05},
    "dpo": {"beta": 0.1, "label_smoothing": 0.0},
    "dpo_ties": {"beta": 0.1, "log_theta": 1.0},
    "dpop": {"beta": 0.1, "lambda_": 50.0},
    "dro_pointwise": {"beta": 0.1},
    "exo_pair": {"beta": 0.1, "label_smoothing": 0.001},
    "fdpo_alpha": {"beta": 0.1, "alpha": 0.5},
    "fdpo_forward_kl": {"beta": 0.1},
    "fdpo_js": {"beta": 0.1},
    "fdpo_reverse_kl": {"beta": 0.1},
    "group_robust_dpo": {"beta": 0.1, "group_weights": None},
    "hinge": {"beta": 0.1},
    "ipo": {"beta": 0.1, "length_normalize": False},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "ld_dpo": {"beta": 0.1, "alpha": 0.5},
    "lipo_lambda": {"beta": 0.1},
    "mmpo": {"beta": 0.1, "gamma": 1.0},
    "mrpo": {"beta": 0.1, "ref_weights": None, "clip": None},
    "nca_pair": {"beta": 0.1},
    "sft": {},
    "orpo": {"beta": 0.1},
    "pro": {"sft_weight": 0.05, "dynamic_temperature": True},
    "rdpo_length": {"beta": 0.1, "alpha": 0.01},
    "rdpo_robust": {"beta": 0.1, "label_smoothing": 0.1},
    "sigmoid_norm": {"beta": 5.0},
    "simpo": {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0},
    "slic_hf": {"delta": 1.0, "lambda_reg": 0.0},
    "sparse_po": {"beta": 0.1},
    "spo_degree": {"beta": 0.1, "temperature": 1.0},
    "sppo_hard": {"beta": 0.1},
    "wpo": {"beta": 0.1},
}

SHARED_POLICY = {"rollout_logprobs": None, "rollout_correction": RolloutCorrection(),
                 "ref_logprobs": None, "kl_coef": 0.0, "kl_estimator": "k3", "entropy": None,
                 "entropy_coef": 0.0}
OTHER_DEFAULTS = {
    (POLICY_LOSSES, "ppo_clip"): {"clip_eps_low": 0.2, "clip_eps_high": None,
                                  "dual_clip_c": None, **SHARED_POLICY},
    (POLICY_LOSSES, "gspo"): {"clip_eps_low": 3e-4, "clip_eps_high": 4e-4, "dual_clip_c": None,
                              **SHARED_POLICY},
    (POLICY_LOSSES, "cispo"): {"clip_eps_low": None, "clip_eps_high": 4.0, **SHARED_POLICY},
    (POLICY_LOSSES, "sapo"): {"tau_pos": 1.0, "tau_neg": 1.05, **SHARED_POLICY},
    (POLICY_LOSSES, "reinforce"): {"old_logprobs": None, **SHARED_POLICY},
    (VALUE_LOSSES, "clipped"): {"clip_eps": 0.2},
    (ADVANTAGE_ESTIMATORS, "gae"): {"values": None, "rewards": None, "scores": None,
                                    "gamma": 1.0, "lam": 0.95},
    (ADVANTAGE_ESTIMATORS, "grpo"): {"scores": None, "rewards": None, "group_ids": None,
                                     "group_size": None, "scale_rewards": "group", "eps": 1e-4},
    (ADVANTAGE_ESTIMATORS, "reinforce_pp"): {"rewards": None, "scores": None, "gamma": 1.0,
                                             "eps": 1e-8},
    (ADVANTAGE_ESTIMATORS, "reinforce"): {"scores": None, "rewards": None, "baseline": False},
}


def test_every_preference_loss_has_its_documented_defaults():
    specs = {loss_spec(name).name: loss_spec(name) for name in PREFERENCE_LOSSES.names()}
    assert {name: spec.defaults for name, spec in specs.items()} == PREFERENCE_DEFAULTS


@pytest.mark.parametrize("registry, name", list(OTHER_DEFAULTS))
def test_policy_value_and_advantage_defaults(registry, name):
    params = inspect.signature(registry.get(name)).parameters.values()
    got = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    assert got == OTHER_DEFAULTS[registry, name]


def test_rollout_correction_defaults_are_tis_per_token_capped_at_two():
    assert RolloutCorrection() == RolloutCorrection(mode="tis", level="token", low=None, high=2.0)
