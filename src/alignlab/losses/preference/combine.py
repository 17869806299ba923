"""Weighted sums of registered losses: MPO = sigmoid + bco_pair + sft, RPO = dpo + sft, ..."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from alignlab.core.errors import ConfigError
from alignlab.losses.preference.base import PREFERENCE_LOSSES, LossResult, PreferenceInputs


def combine_losses(weights: Mapping[str, float], inputs: PreferenceInputs, *,
                   per_loss: Mapping[str, Mapping[str, Any]] | None = None,
                   **hyper_parameters: Any) -> LossResult:
    """Σ_k w_k·loss_k(inputs) per example.

    Each keyword in ``hyper_parameters`` goes to every loss whose signature has it (``beta``
    reaches sigmoid and bco_pair but not sft); a keyword no loss accepts is an error.
    ``per_loss={"bco_pair": {"reward_shift": δ}}`` overrides for one loss. The implicit rewards
    are those of the first loss that defines them; metrics are prefixed ``name/``, and
    ``name/loss`` is each term's unweighted mean.

    Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large Language Models via
    Mixed Preference Optimization" (MPO weights 0.8, 0.2, 1 in the paper)."""
    if not weights:
        raise ConfigError("combine_losses needs at least one loss name with a weight")
    per_loss = dict(per_loss or {})
    unknown_targets = set(per_loss) - set(weights)
    if unknown_targets:
        raise ConfigError(f"per_loss names {sorted(unknown_targets)} are not in the weights "
                          f"{sorted(weights)}")
    fns = {name: PREFERENCE_LOSSES.get(name) for name in weights}
    accepted = {name: set(inspect.signature(fn).parameters) for name, fn in fns.items()}
    unused = [k for k in hyper_parameters if not any(k in params for params in accepted.values())]
    if unused:
        raise ConfigError(f"hyper-parameter(s) {unused} are accepted by none of the losses "
                          f"{sorted(weights)}")

    total = None
    chosen = rejected = None
    metrics = {}
    for name, weight in weights.items():
        kwargs = {k: v for k, v in hyper_parameters.items() if k in accepted[name]}
        kwargs.update(per_loss.get(name, {}))
        result = fns[name](inputs, **kwargs)
        if total is not None and result.losses.shape != total.shape:
            raise ConfigError(f"cannot combine {name!r}: its losses have shape "
                              f"{tuple(result.losses.shape)}, the others {tuple(total.shape)}")
        total = weight * result.losses if total is None else total + weight * result.losses
        if chosen is None and result.chosen_rewards is not None:
            chosen, rejected = result.chosen_rewards, result.rejected_rewards
        metrics[f"{name}/loss"] = result.losses.detach().mean()
        metrics.update({f"{name}/{k}": v for k, v in result.metrics.items()})
    return LossResult(total, chosen, rejected, metrics)
