"""The reward registry and the contract every reward function keeps.

A reward function is batched::

    fn(prompts: list[str], completions: list[str], **fields) -> list[float]

``fields`` are the row's extra columns, each a list aligned with ``prompts``; a function uses
the ones it knows and ignores the rest. It returns one finite float per completion: callers
go through :func:`get_reward` / :func:`weighted_sum`, which raise ``RewardError`` on a
non-finite value, a wrong count, or an exception inside the function.

Completions are scored as text: everything from the first end-of-turn marker on is dropped
and other chat markers are removed (:func:`completion_text`), so a decode that keeps special
tokens scores the same as one that skips them.

Two optional extensions, both read by the online-RL reward role (``trainers/reward_role.py``):

- a function may return an ``alignlab.rewards.RewardValues`` (a list with a ``metrics`` dict,
  e.g. how many programs timed out); the metrics are logged as ``reward/<name>/<key>``;
- a *per-token* reward is marked ``fn.per_token = True``. It is also given
  ``completion_ids`` (the sampled token ids of each completion, without the eos) and returns,
  per completion, a list with one float per id: dense rewards r_t on those tokens. Their sum is
  the completion's score for sequence-level estimators (GRPO, RLOO, ReMax); token-level ones
  (REINFORCE++, GAE) get them in place.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence

from alignlab.core.errors import ConfigError, RewardError
from alignlab.core.registry import Registry

RewardFn = Callable[..., list[float]]

REWARDS: Registry[RewardFn] = Registry("reward", builtins=(
    "alignlab.rewards.arithmetic", "alignlab.rewards.code", "alignlab.rewards.lexical",
    "alignlab.rewards.reward_model"))

# End-of-turn markers of common chat templates (the built-in world's and Phi-3's ``<|end|>``,
# ChatML's, Llama 3's, Gemma's, and plain end-of-text markers). A completion decoded with its
# special tokens is cut at the first one, so it scores as if decoded without them.
END_OF_TURN = re.compile(r"<\|end\|>|<\|im_end\|>|<\|eot_id\|>|<end_of_turn>|<\|endoftext\|>|</s>")
_MARKER = re.compile(r"<\|[a-z_]+\|>|<start_of_turn>|</s>")


def completion_text(completion: str) -> str:
    """The completion up to its first end-of-turn marker (``END_OF_TURN``), other chat markers
    removed, whitespace stripped."""
    return _MARKER.sub(" ", END_OF_TURN.split(completion, 1)[0]).strip()


def check_rewards(values: Sequence[float], n: int, name: str) -> list[float]:
    """``values`` as python floats; ``RewardError`` unless there are ``n`` of them, all finite."""
    values = [float(v) for v in values]
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RewardError(f"reward {name!r} returned non-finite values at rows {bad[:5]}: "
                          f"{[values[i] for i in bad[:5]]}")
    return values


def get_reward(name: str, **params) -> RewardFn:
    """The registered reward ``name`` with ``params`` bound, its output checked (see module doc)."""
    fn = REWARDS.get(name)
    if params:
        fn = functools.partial(fn, **params)

    def reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
        if len(prompts) != len(completions):
            raise RewardError(f"reward {name!r}: {len(prompts)} prompts but {len(completions)} completions")
        try:
            values = fn(prompts, completions, **fields)
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
        return check_rewards(values, len(completions), name)

    reward.__name__ = name
    reward.__doc__ = REWARDS.summary(name)
    return reward


def weighted_sum(weights: Mapping[str, float],
                 params: Mapping[str, Mapping[str, object]] | None = None) -> RewardFn:
    """``r = Σ_k w_k · r_k`` over registered rewards ``k``; ``params[k]`` are bound to ``r_k``."""
    if not weights:
        raise ConfigError("weighted_sum needs at least one reward weight")
    params = params or {}
    unknown = sorted(set(params) - set(weights))
    if unknown:
        raise ConfigError(f"reward params given for {unknown} which have no weight")
    parts = [(w, get_reward(name, **params.get(name, {}))) for name, w in weights.items()]

    def reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
        total = [0.0] * len(completions)
        for w, fn in parts:
            total = [t + w * v for t, v in zip(total, fn(prompts, completions, **fields))]
        return total

    reward.__name__ = " + ".join(f"{w:g}*{name}" for name, w in weights.items())
    return reward
