"""Tasks of the feedback world: prompt sets, gold rewards, demonstrations.

A task's prompts are drawn from the same grammar as the pretraining corpus
(:mod:`alignlab.world.language`), so a base model continues them naturally. Completions follow
the prompt/completion convention there: they start with a space and carry no ``END``
(the SFT data path appends the tokenizer's eos token).

- ``positive``: continue a review prefix (``review of the cafe : the soup was``); gold = VADER
  compound of the completion.
- ``arithmetic``: answer ``question : 12 + 7 = ? answer :``; gold = exact match of the first
  integer of the completion with the true sum.
- ``positive_short``: the prompts of ``positive``; criteria ``sentiment`` (VADER compound,
  [-1, 1]) and ``brevity`` (``1 − min(words, 32)/32``, [0, 1]) pull against each other, since
  more positive sentences mean more words; gold = ``0.5·sentiment + 0.5·brevity``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from alignlab.core.errors import ConfigError
from alignlab.core.registry import Registry
from alignlab.rewards.registry import get_reward
from alignlab.world import language as lang

Scorer = Callable[[list[str], list[str]], list[float]]


@dataclass
class Task:
    """A prompt distribution with a gold reward and a source of good demonstrations."""

    name: str
    description: str
    train_prompts: list[str]
    eval_prompts: list[str]
    criteria_fns: dict[str, Scorer]
    criteria_weights: dict[str, float]
    demonstrate: Callable[[random.Random], dict[str, str]] = field(repr=False)
    max_new_tokens: int = 48

    def criteria(self, prompts: list[str], completions: list[str]) -> dict[str, list[float]]:
        """Each named gold criterion, one score per completion."""
        return {name: fn(prompts, completions) for name, fn in self.criteria_fns.items()}

    def gold(self, prompts: list[str], completions: list[str]) -> list[float]:
        """``Σ_k weight_k · criterion_k`` (a single criterion has weight 1)."""
        scores = self.criteria(prompts, completions)
        total = [0.0] * len(completions)
        for name, w in self.criteria_weights.items():
            total = [t + w * s for t, s in zip(total, scores[name])]
        return total

    def demonstrations(self, n: int, seed: int = 0) -> list[dict[str, str]]:
        """``n`` rows ``{prompt, completion}`` of good completions on train prompts."""
        rng = random.Random(seed)
        return [self.demonstrate(rng) for _ in range(n)]


TaskFactory = Callable[..., Task]
TASKS: Registry[TaskFactory] = Registry("task")


def make_task(name: str, seed: int = 0, n_train: int = 512, n_eval: int = 128) -> Task:
    """The task ``name`` with ``n_train`` train and ``n_eval`` disjoint eval prompts drawn with ``seed``."""
    if n_train < 1 or n_eval < 1:
        raise ConfigError(f"task {name!r}: n_train and n_eval must be positive, got {n_train}, {n_eval}")
    return TASKS.get(name)(seed=seed, n_train=n_train, n_eval=n_eval)


def _split(pool: list, seed: int, n_train: int, n_eval: int, task: str) -> tuple[list, list]:
    if n_train + n_eval > len(pool):
        raise ConfigError(f"task {task!r} has {len(pool)} distinct prompts; "
                          f"n_train + n_eval = {n_train + n_eval} is too many")
    pool = list(pool)
    random.Random(seed).shuffle(pool)
    return pool[:n_train], pool[n_train:n_train + n_eval]


def _unbatched_fields(fn: Scorer) -> Scorer:
    # Gold scorers see only prompts and completions, never row fields a user might pass.
    return lambda prompts, completions: fn(prompts, completions)


def _review_task(name: str, description: str, seed: int, n_train: int, n_eval: int,
                 criteria: dict[str, Scorer], weights: dict[str, float],
                 n_sentences: int | None, max_new_tokens: int) -> Task:
    train, evals = _split(lang.all_review_prefixes(), seed, n_train, n_eval, name)

    def demonstrate(rng: random.Random) -> dict[str, str]:
        prefix = rng.choice(train)
        return {"prompt": prefix.text,
                "completion": lang.complete_review(rng, prefix, p=1.0, n_sentences=n_sentences)}

    return Task(name, description, [p.text for p in train], [p.text for p in evals],
                criteria, weights, demonstrate, max_new_tokens)


@TASKS.register("positive")
def positive_task(seed: int = 0, n_train: int = 512, n_eval: int = 128) -> Task:
    """Continue a review positively; gold = VADER compound of the completion."""
    return _review_task(
        "positive", "Continue a review prefix; gold is the VADER compound sentiment of the completion.",
        seed, n_train, n_eval, {"sentiment": _unbatched_fields(get_reward("vader_sentiment"))},
        {"sentiment": 1.0}, n_sentences=None, max_new_tokens=48)


POSITIVE_SHORT_WEIGHTS = {"sentiment": 0.5, "brevity": 0.5}
POSITIVE_SHORT_MAX_WORDS = 32


@TASKS.register("positive_short")
def positive_short_task(seed: int = 0, n_train: int = 512, n_eval: int = 128) -> Task:
    """Continue a review positively and briefly: 0.5·sentiment + 0.5·brevity (conflicting)."""
    criteria = {"sentiment": _unbatched_fields(get_reward("vader_sentiment")),
                "brevity": _unbatched_fields(get_reward("brevity", max_words=POSITIVE_SHORT_MAX_WORDS))}
    return _review_task(
        "positive_short",
        "Continue a review prefix positively but briefly; gold = 0.5*VADER compound + "
        f"0.5*(1 - min(words, {POSITIVE_SHORT_MAX_WORDS})/{POSITIVE_SHORT_MAX_WORDS}).",
        seed, n_train, n_eval, criteria, dict(POSITIVE_SHORT_WEIGHTS), n_sentences=1,
        max_new_tokens=48)


@TASKS.register("arithmetic")
def arithmetic_task(seed: int = 0, n_train: int = 512, n_eval: int = 128) -> Task:
    """Answer an addition problem; gold = 1 if the first integer of the completion is the sum."""
    pool = [(a, b) for a in range(lang.MAX_OPERAND + 1) for b in range(lang.MAX_OPERAND + 1)]
    train, evals = _split(pool, seed, n_train, n_eval, "arithmetic")

    def demonstrate(rng: random.Random) -> dict[str, str]:
        a, b = rng.choice(train)
        return {"prompt": lang.arithmetic_prompt(a, b), "completion": lang.arithmetic_completion(a + b)}

    return Task(
        "arithmetic", "Answer 'question : a + b = ? answer :'; gold is 1 for the exact sum, else 0.",
        [lang.arithmetic_prompt(a, b) for a, b in train], [lang.arithmetic_prompt(a, b) for a, b in evals],
        {"correct": _unbatched_fields(get_reward("arithmetic_exact"))}, {"correct": 1.0},
        demonstrate, max_new_tokens=8)
