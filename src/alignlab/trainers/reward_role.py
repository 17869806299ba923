"""The reward role of the online-RL controller: resolve reward names, score completions.

``RewardRole.score`` computes ``r = Σ_k w_k r_k`` over its components, batched, and applies
the run's failure policy (``rl.on_reward_error``): a component that raises or returns
NaN/inf/None stops the run with the offending sample, or the sample is skipped and counted.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignlab.errors import ConfigError, RewardError

RawReward = Callable[..., Sequence[float]]


def resolve_reward(name: str, task: Any = None, params: Mapping[str, Any] | None = None,
                   *, field: str = "rl.reward") -> RawReward:
    """``gold`` (the world task's gold reward), ``module:function``, or a ``REWARDS`` name."""
    if name == "gold":
        if task is None:
            raise ConfigError(f"{field}: 'gold' needs prompts from a world task "
                              "(rollout.prompts: world:<task>)")
        return lambda prompts, completions, **_: task.gold(prompts, completions)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{field}: cannot load user reward {name!r}: {exc}") from None
        if not callable(fn):
            raise ConfigError(f"{field}: {name!r} is not callable")
    else:
        from alignlab.rewards.registry import REWARDS

        try:
            fn = REWARDS.get(name)
        except Exception as exc:
            raise ConfigError(f"{field}: {exc}") from None
    return functools.partial(fn, **params) if params else fn


@dataclass
class RewardScores:
    scores: list[float]
    """The weighted sum; NaN where a component failed and the row was skipped."""
    valid: list[bool]
    skipped: int = 0
    components: dict[str, list[float]] = field(default_factory=dict)


class RewardRole:
    """Scores completions with ``r = Σ_k w_k r_k``, batched; failures stop or skip (counted)."""

    def __init__(self, components: Mapping[str, tuple[float, RawReward]],
                 on_error: str = "stop") -> None:
        if on_error not in ("stop", "skip"):
            raise ConfigError(f"rl.on_reward_error: got {on_error!r}; allowed values: stop, skip")
        self.components, self.on_error = dict(components), on_error
        self.total_skipped = 0

    def score(self, prompts: list[str], completions: list[str],
              fields: Mapping[str, list[Any]] | None = None) -> RewardScores:
        fields = dict(fields or {})
        n = len(completions)
        total, valid, parts = [0.0] * n, [True] * n, {}
        for name, (weight, fn) in self.components.items():
            values, bad, why = self._call(name, fn, prompts, completions, fields)
            if bad:
                i = bad[0]
                msg = (f"reward {name!r} {why} (rows {bad[:5]} of {n}); first offending sample:\n"
                       f"  prompt: {prompts[i]!r}\n  completion: {completions[i]!r}")
                if self.on_error == "stop":
                    raise RewardError(msg + "\nSet rl.on_reward_error: skip to drop such samples.")
                warnings.warn(f"skipping {len(bad)} sample(s): {msg}", stacklevel=2)
                for i in bad:
                    valid[i] = False
            parts[name] = values
            total = [t + weight * v for t, v in zip(total, values)]
        skipped = n - sum(valid)
        self.total_skipped += skipped
        scores = [t if ok else math.nan for t, ok in zip(total, valid)]
        return RewardScores(scores, valid, skipped, parts)

    @staticmethod
    def _call(name: str, fn: RawReward, prompts: list[str], completions: list[str],
              fields: dict[str, list[Any]]) -> tuple[list[float], list[int], str]:
        """(values with 0 at bad rows, bad rows, what went wrong)."""
        n = len(completions)
        try:
            raw = list(fn(prompts, completions, **fields))
        except Exception as exc:
            why = f"raised {type(exc).__name__}: {exc}"
            # Find the rows that make it raise by scoring them one at a time.
            bad = []
            for i in range(n):
                try:
                    fn(prompts[i:i + 1], completions[i:i + 1],
                       **{k: v[i:i + 1] for k, v in fields.items()})
                except Exception:
                    bad.append(i)
            good = [i for i in range(n) if i not in set(bad)]
            values = [0.0] * n
            if bad and good:  # score the rest in one batched call, as the function expects
                sub, sub_bad, sub_why = RewardRole._call(
                    name, fn, [prompts[i] for i in good], [completions[i] for i in good],
                    {k: [v[i] for i in good] for k, v in fields.items()})
                if sub_bad:
                    return values, list(range(n)), why
                for i, v in zip(good, sub):
                    values[i] = v
            return values, bad or list(range(n)), why
        if len(raw) != n:
            return [0.0] * n, list(range(n)), f"returned {len(raw)} values for {n} completions"
        values, bad = [], []
        for i, v in enumerate(raw):
            try:
                v = float(v)
            except (TypeError, ValueError):
                v = math.nan
            if not math.isfinite(v):
                bad.append(i)
                v = 0.0
            values.append(v)
        shown = [raw[i] for i in bad[:5]]
        return values, bad, f"returned None/NaN/inf or non-numbers {shown}"


