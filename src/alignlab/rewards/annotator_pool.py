"""A pool of simulated annotators with different biases, in the manner of AlpacaFarm (Dubois et
al. 2023, "AlpacaFarm: A Simulation Framework for Methods that Learn from Human Feedback").

AlpacaFarm simulates human feedback with a *pool* of annotators (different models, prompts and
in-context examples) and labels each example by one annotator drawn at random, so that the
labels carry the spread of biases and the inconsistency of a crowd of humans; its training
pool also flips 25% of the labels. Here every annotator of the pool (``PoolAnnotator``)
perceives ``ũ(y) = gold(y) + length_bias · words(y)`` and labels the pair (a, b) *as shown*, a
first:

1. a pair whose gold differs by at most ``tie_margin`` is a tie (P = 1/2, no label flips);
2. with probability ``position_bias`` it picks the response shown first, a, without comparing
   (the position bias of LLM annotators, Zheng et al. 2023); otherwise a Bradley-Terry draw
   picks a with probability ``q = σ((ũ_a − ũ_b) / temperature)``;
3. the label is flipped with probability ``flip_rate`` (the annotator's noise), then again with
   the pool's ``flip_rate``; their net flip probability is ``φ = f + F − 2fF``.

So the verdict's ``P(a ≻ b)`` — the probability that the annotator labels a — is
``s(1 − φ) + (1 − s)φ`` with ``s = π + (1 − π)q``.

Each example (prompt and the unordered pair) goes to the annotator
``sha256(seed, prompt, sorted(a, b)) mod K``: the same one in any batch or order, and for the
swapped pair. The draws of steps 2–3 come from a hash of (seed, annotator name, prompt, a, b)
and not of the rates, so two pools that differ only in a rate see the same uniforms (a higher
flip rate flips a superset of the labels). Labels are cached (``judges/cache.py``, JSONL) under
the annotator's full settings, the pool's flip rate and the gold's name: nothing is labelled
twice (``cache.hits`` / ``cache.misses``).

``agreement(pool, prompts, a, b)`` reports each annotator's and the pool's agreement with gold.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignlab.core.errors import ConfigError
from alignlab.rewards.judges.base import Verdict
from alignlab.rewards.judges.cache import VerdictCache, verdict_key
from alignlab.rewards.lexical import num_words

GoldFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass(frozen=True)
class PoolAnnotator:
    """One annotator's biases (see the module docstring)."""

    name: str
    temperature: float = 0.05
    """τ of the Bradley-Terry draw, in gold units; 0 always picks the higher ũ."""
    length_bias: float = 0.0
    """Its taste for length, in gold units per word (negative: prefers short)."""
    position_bias: float = 0.0
    """Probability of picking the response shown first without comparing."""
    flip_rate: float = 0.0
    """Probability of flipping its label."""
    tie_margin: float | None = None
    """Pairs whose gold differs by at most this are ties."""

    def __post_init__(self) -> None:
        where = f"annotator {self.name!r}"
        if self.temperature < 0:
            raise ConfigError(f"{where}: temperature must be >= 0, got {self.temperature}")
        for f in ("position_bias", "flip_rate"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ConfigError(f"{where}: {f} must be in [0, 1], got {getattr(self, f)}")
        if self.tie_margin is not None and self.tie_margin < 0:
            raise ConfigError(f"{where}: tie_margin must be >= 0, got {self.tie_margin}")


DEFAULT_POOL: tuple[PoolAnnotator, ...] = (
    # Four annotators with the kinds of bias AlpacaFarm's pool shows: one careful, one that
    # likes long answers, one that often takes the first response, one noisy.
    PoolAnnotator("careful", temperature=0.05),
    PoolAnnotator("verbose", temperature=0.05, length_bias=0.02),
    PoolAnnotator("first_shown", temperature=0.1, position_bias=0.25),
    PoolAnnotator("noisy", temperature=0.3, flip_rate=0.15),
)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _hash(blob: Any) -> int:
    return int(hashlib.sha256(json.dumps(blob, ensure_ascii=False).encode("utf-8")).hexdigest(), 16)


@dataclass
class AnnotatorPool:
    """Labels pairs by the annotator each example is assigned to; a ``PairwiseJudge``."""

    gold: GoldFn = field(repr=False)
    annotators: Sequence[PoolAnnotator] = DEFAULT_POOL
    name: str = "gold"
    """Names the gold reward in the cache key (e.g. the task)."""
    flip_rate: float = 0.0
    """The pool's extra flip on every label (AlpacaFarm's training pool: 0.25)."""
    seed: int = 0
    cache_path: str | Path | None = None

    def __post_init__(self) -> None:
        self.annotators = tuple(self.annotators)
        if not self.annotators:
            raise ConfigError("annotator pool: needs at least one annotator")
        names = [a.name for a in self.annotators]
        if len(set(names)) != len(names) or "pool" in names:
            raise ConfigError(f"annotator pool: annotator names must differ and not be 'pool' "
                              f"(the report's name for the whole pool), got {names}")
        if not 0.0 <= self.flip_rate <= 1.0:
            raise ConfigError(f"annotator pool: flip_rate must be in [0, 1], got {self.flip_rate}")
        self.cache = VerdictCache(self.cache_path)

    # ---- the PairwiseJudge interface --------------------------------------------------------

    def assign(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[int]:
        """The annotator of each example: a hash of (seed, prompt, the unordered pair)."""
        return [_hash([self.seed, "assign", p, sorted([x, y])]) % len(self.annotators)
                for p, x, y in zip(prompts, a, b)]

    def cached(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[bool]:
        who = self.assign(prompts, a, b)
        return [self._key(k, p, x, y) in self.cache for k, p, x, y in zip(who, prompts, a, b)]

    def judge(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        if not len(prompts) == len(a) == len(b):
            raise ConfigError(f"annotator pool: {len(prompts)} prompts, {len(a)} a, {len(b)} b")
        return self._label(self.assign(prompts, a, b), prompts, a, b)

    def label_by(self, annotator: int, prompts: Sequence[str], a: Sequence[str],
                 b: Sequence[str]) -> list[Verdict]:
        """Every pair labelled by annotator number ``annotator`` (shares the cache)."""
        return self._label([annotator] * len(prompts), prompts, a, b)

    def counters(self) -> dict[str, int]:
        return self.cache.counters()

    def load_counters(self, state: dict[str, int]) -> None:
        self.cache.load_counters(state)

    # ---- labelling ------------------------------------------------------------------------

    def _key(self, k: int, prompt: str, a: str, b: str) -> str:
        identity = {"judge": "pool", "gold": self.name, "seed": self.seed,
                    "pool_flip_rate": self.flip_rate, "annotator": asdict(self.annotators[k])}
        return verdict_key(identity, prompt, a, b)

    def _label(self, who: list[int], prompts: Sequence[str], a: Sequence[str],
               b: Sequence[str]) -> list[Verdict]:
        keys = [self._key(k, p, x, y) for k, p, x, y in zip(who, prompts, a, b)]

        def compute(idx: list[int]) -> list[Verdict]:
            gold = [float(g) for g in self.gold([prompts[i] for i in idx] * 2,
                                                [a[i] for i in idx] + [b[i] for i in idx])]
            n = len(idx)
            return [self._draw(who[i], prompts[i], a[i], b[i], gold[j], gold[n + j])
                    for j, i in enumerate(idx)]

        return self.cache.lookup(keys, compute)

    def _draw(self, k: int, prompt: str, a: str, b: str, gold_a: float, gold_b: float) -> Verdict:
        ann = self.annotators[k]
        detail = {"annotator": ann.name, "gold_a": gold_a, "gold_b": gold_b}
        if ann.tie_margin is not None and abs(gold_a - gold_b) <= ann.tie_margin:
            return Verdict(0.5, None, {**detail, "position": False, "flipped": False})
        rng = random.Random(_hash([self.seed, "draw", ann.name, prompt, a, b]))
        u_position, u_draw, u_flip, u_pool_flip = (rng.random() for _ in range(4))
        diff = (gold_a + ann.length_bias * num_words(a)) - (gold_b + ann.length_bias * num_words(b))
        if ann.temperature == 0:
            q = 0.5 if diff == 0 else float(diff > 0)
        else:
            q = _sigmoid(diff / ann.temperature)
        position = u_position < ann.position_bias
        a_preferred = True if position else u_draw < q
        flipped = (u_flip < ann.flip_rate) != (u_pool_flip < self.flip_rate)
        s = ann.position_bias + (1 - ann.position_bias) * q
        phi = ann.flip_rate + self.flip_rate - 2 * ann.flip_rate * self.flip_rate
        return Verdict(s * (1 - phi) + (1 - s) * phi, a_preferred != flipped,
                       {**detail, "position": position, "flipped": flipped})


@dataclass
class Agreement:
    """Labels that side with gold, of the ``decided`` ones (not a tie, gold not equal)."""

    pairs: int = 0
    decided: int = 0
    agree: int = 0
    ties: int = 0

    @property
    def rate(self) -> float:
        return self.agree / self.decided if self.decided else float("nan")

    def add(self, verdict: Verdict) -> None:
        self.pairs += 1
        gold_a, gold_b = verdict.detail["gold_a"], verdict.detail["gold_b"]
        if verdict.a_preferred is None:
            self.ties += 1
        elif gold_a != gold_b:
            self.decided += 1
            self.agree += verdict.a_preferred == (gold_a > gold_b)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "agreement": self.rate}


def agreement(pool: AnnotatorPool, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
              ) -> dict[str, Agreement]:
    """Agreement with gold on the given pairs: each annotator labelling every pair (by name)
    and ``"pool"``, each pair labelled by its assigned annotator. Labels go through the pool's
    cache (the pool's own labels are those its ``judge`` gives)."""
    report = {}
    for k, ann in enumerate(pool.annotators):
        report[ann.name] = Agreement()
        for v in pool.label_by(k, prompts, a, b):
            report[ann.name].add(v)
    report["pool"] = Agreement()
    for v in pool.judge(prompts, a, b):
        report["pool"].add(v)
    return report


__all__ = ["DEFAULT_POOL", "Agreement", "AnnotatorPool", "PoolAnnotator", "agreement"]
