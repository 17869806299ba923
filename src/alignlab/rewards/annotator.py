"""Simulated annotators: noisy, seeded, cached labels from a task's gold reward.

AlpacaFarm (Dubois et al. 2023, "AlpacaFarm: A Simulation Framework for Methods that Learn from
Human Feedback") trains on simulated annotators whose labels are deliberately noisy (its
training annotators flip 25% of their labels) so that methods face human-like inconsistency.
Here the annotator perceives ``ũ(y) = g(y) + length_bias · words(y)`` (gold plus a taste for
length, in gold units per word, so the bias still acts at temperature 0) and

- pairs: ``P(a ≻ b) = σ((ũ_a − ũ_b) / temperature)`` (a Bradley-Terry draw), then the label is
  flipped with probability ``flip_rate``; pairs whose gold differs by at most ``tie_margin``
  are recorded as ties when ``tie_margin`` is set;
- lists: scores ``s_i = ũ_i + temperature · Gumbel_i``, whose order is a Plackett-Luce draw with
  weights ``exp(ũ_i / temperature)`` (the listwise Bradley-Terry); with probability
  ``flip_rate`` the list is reversed (``s → −s``), which at K = 2 is exactly the pairwise flip;
- single completions: ``label = 1[ũ + temperature · Logistic > threshold]``, i.e.
  ``P(label) = σ((ũ − threshold) / temperature)``, then flipped with probability ``flip_rate``.

Every judgement draws its randomness from a hash of (seed, annotator settings, prompt,
completions in sorted order), so it is the same in any batch, in any order, and for (b, a) it
is the mirror of (a, b). Judgements are cached in a JSONL file under that hash: re-labelling is
free and reproducible.
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
from alignlab.rewards.lexical import num_words

GoldFn = Callable[[list[str], list[str]], list[float]]

CACHE_VERSION = 1


@dataclass
class PairLabel:
    """The judgement of (a, b): ``a_preferred`` is None for a tie."""

    a_preferred: bool | None
    p_a: float
    """``P(a ≻ b)`` of the Bradley-Terry draw, before the flip."""
    flipped: bool
    gold_a: float
    gold_b: float

    @property
    def gold_agrees(self) -> bool | None:
        """Whether the label picks the higher-gold completion (None for a tie or equal gold)."""
        if self.a_preferred is None or self.gold_a == self.gold_b:
            return None
        return self.a_preferred == (self.gold_a > self.gold_b)


@dataclass
class RankLabel:
    """The judgement of a list: ``scores`` (higher is better) and ``order`` (best first)."""

    scores: list[float]
    gold: list[float]
    flipped: bool

    @property
    def order(self) -> list[int]:
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])


@dataclass
class PointLabel:
    """The judgement of one completion: desirable (True) or not."""

    label: bool
    p_desirable: float
    flipped: bool
    gold: float


@dataclass
class AnnotatorStats:
    judgements: int = 0
    """Pairs, lists or single completions judged."""
    comparisons: int = 0
    """Judgements (pairwise comparisons inside lists) that the gold reward decides."""
    agree: int = 0
    """Of ``comparisons``, how many side with the gold reward."""
    flipped: int = 0
    ties: int = 0
    cache_hits: int = 0

    @property
    def agreement(self) -> float:
        return self.agree / self.comparisons if self.comparisons else float("nan")

    @property
    def flip_fraction(self) -> float:
        return self.flipped / self.judgements if self.judgements else float("nan")

    def __sub__(self, earlier: AnnotatorStats) -> AnnotatorStats:
        """The counts added since ``earlier`` (a copy taken with ``dataclasses.replace``)."""
        return AnnotatorStats(**{k: v - getattr(earlier, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "agreement": self.agreement, "flip_fraction": self.flip_fraction}


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass
class SimulatedAnnotator:
    """Labels pairs, lists and single completions from ``gold`` (see the module docstring)."""

    gold: GoldFn = field(repr=False)
    name: str = "gold"
    """Identifies the gold reward in the cache key (e.g. the task name)."""
    temperature: float = 0.05
    flip_rate: float = 0.25
    length_bias: float = 0.0
    tie_margin: float | None = None
    seed: int = 0
    cache_path: str | Path | None = None
    stats: AnnotatorStats = field(default_factory=AnnotatorStats, init=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"annotator temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.flip_rate <= 1.0:
            raise ConfigError(f"annotator flip_rate must be in [0, 1], got {self.flip_rate}")
        if self.tie_margin is not None and self.tie_margin < 0:
            raise ConfigError(f"annotator tie_margin must be >= 0, got {self.tie_margin}")
        self._cache: dict[str, dict[str, Any]] = {}
        if self.cache_path is not None:
            self.cache_path = Path(self.cache_path)
            if self.cache_path.exists():
                self._cache = _read_cache(self.cache_path)

    @classmethod
    def for_task(cls, task, **settings) -> SimulatedAnnotator:
        """An annotator whose gold is ``task.gold``."""
        return cls(gold=task.gold, name=task.name, **settings)

    # ---- public judgements ---------------------------------------------------------------

    def label_pairs(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[PairLabel]:
        """One :class:`PairLabel` per (prompt, a, b)."""
        if not len(prompts) == len(a) == len(b):
            raise ConfigError(f"label_pairs: {len(prompts)} prompts, {len(a)} a, {len(b)} b")
        out = self._judge("pair", [(p, [x, y]) for p, x, y in zip(prompts, a, b)], self._pair)
        labels = []
        for rec, swapped in out:
            lab = PairLabel(**rec)
            if swapped:
                pref = None if lab.a_preferred is None else not lab.a_preferred
                lab = PairLabel(pref, 1.0 - lab.p_a, lab.flipped, lab.gold_b, lab.gold_a)
            labels.append(lab)
            self._count(1, [lab.gold_agrees], lab.flipped, lab.a_preferred is None)
        return labels

    def cached_pairs(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[bool]:
        """Whether each pair's label is already cached (labelling it again would be free)."""
        return [self._key("pair", p, sorted([x, y])) in self._cache for p, x, y in zip(prompts, a, b)]

    def rank(self, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> list[RankLabel]:
        """One :class:`RankLabel` per (prompt, list of completions)."""
        out = self._judge("list", [(p, list(cs)) for p, cs in zip(prompts, completions)], self._list)
        labels = []
        for (rec, perm), cs in zip(out, completions):
            # The record is in sorted-completion order; perm[i] is where item i of the query sits.
            lab = RankLabel([rec["scores"][j] for j in perm], [rec["gold"][j] for j in perm], rec["flipped"])
            labels.append(lab)
            agrees = [(lab.scores[i] > lab.scores[j]) == (lab.gold[i] > lab.gold[j])
                      for i in range(len(cs)) for j in range(i + 1, len(cs)) if lab.gold[i] != lab.gold[j]]
            self._count(1, agrees, lab.flipped, False)
        return labels

    def label_points(self, prompts: Sequence[str], completions: Sequence[str], *,
                     threshold: float = 0.0) -> list[PointLabel]:
        """One :class:`PointLabel` per (prompt, completion): desirable when above ``threshold``."""
        items = [(p, [c]) for p, c in zip(prompts, completions)]
        out = self._judge(f"point@{threshold!r}", items, lambda rng, g, w: self._point(rng, g, w, threshold))
        labels = []
        for rec, _ in out:
            lab = PointLabel(**rec)
            labels.append(lab)
            decided = None if lab.gold == threshold else lab.label == (lab.gold > threshold)
            self._count(1, [decided], lab.flipped, False)
        return labels

    # ---- the three noise models, on canonical (sorted) items --------------------------------

    def _utility(self, gold: float, words: int) -> float:
        return gold + self.length_bias * words

    def _pair(self, rng: random.Random, gold: list[float], words: list[int]) -> dict[str, Any]:
        u_draw, u_flip = rng.random(), rng.random()
        diff = self._utility(gold[0], words[0]) - self._utility(gold[1], words[1])
        if self.temperature == 0:
            p_a = 0.5 if diff == 0 else float(diff > 0)
        else:
            p_a = _sigmoid(diff / self.temperature)
        if self.tie_margin is not None and abs(gold[0] - gold[1]) <= self.tie_margin:
            return {"a_preferred": None, "p_a": p_a, "flipped": False, "gold_a": gold[0], "gold_b": gold[1]}
        flipped = u_flip < self.flip_rate
        return {"a_preferred": (u_draw < p_a) != flipped, "p_a": p_a, "flipped": flipped,
                "gold_a": gold[0], "gold_b": gold[1]}

    def _list(self, rng: random.Random, gold: list[float], words: list[int]) -> dict[str, Any]:
        gumbel = [-math.log(-math.log(max(rng.random(), 1e-300))) for _ in gold]
        flipped = rng.random() < self.flip_rate
        scores = [self._utility(g, w) + self.temperature * z for g, w, z in zip(gold, words, gumbel)]
        if flipped:
            scores = [-s for s in scores]
        return {"scores": scores, "gold": gold, "flipped": flipped}

    def _point(self, rng: random.Random, gold: list[float], words: list[int], threshold: float) -> dict[str, Any]:
        u_draw, u_flip = rng.random(), rng.random()
        diff = self._utility(gold[0], words[0]) - threshold
        if self.temperature == 0:
            p = 0.5 if diff == 0 else float(diff > 0)
        else:
            p = _sigmoid(diff / self.temperature)
        flipped = u_flip < self.flip_rate
        return {"label": (u_draw < p) != flipped, "p_desirable": p, "flipped": flipped, "gold": gold[0]}

    # ---- hashing, caching, gold in one batch -------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {"v": CACHE_VERSION, "name": self.name, "seed": self.seed, "temperature": self.temperature,
                "flip_rate": self.flip_rate, "length_bias": self.length_bias, "tie_margin": self.tie_margin}

    def _key(self, kind: str, prompt: str, items: list[str]) -> str:
        blob = json.dumps([self._settings(), kind, prompt, items], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _judge(self, kind: str, queries: list[tuple[str, list[str]]],
               judge: Callable[[random.Random, list[float], list[int]], dict[str, Any]]) -> list[tuple[dict, Any]]:
        """Records in canonical order plus how to map them back (pairs: swapped; lists: perm)."""
        canon, keys = [], []
        for prompt, items in queries:
            order = sorted(range(len(items)), key=lambda i: items[i])
            sorted_items = [items[i] for i in order]
            # perm[i] = the canonical position of query item i
            perm = [0] * len(items)
            for pos, i in enumerate(order):
                perm[i] = pos
            canon.append((prompt, sorted_items, perm))
            keys.append(self._key(kind, prompt, sorted_items))
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        self.stats.cache_hits += len(queries) - len(missing)
        if missing:
            flat_p = [canon[i][0] for i in missing for _ in canon[i][1]]
            flat_c = [c for i in missing for c in canon[i][1]]
            gold = [float(g) for g in self.gold(flat_p, flat_c)]
            new, at = {}, 0
            for i in missing:
                items = canon[i][1]
                g, at = gold[at:at + len(items)], at + len(items)
                rng = random.Random(int(keys[i], 16))
                new[keys[i]] = judge(rng, g, [num_words(c) for c in items])
            self._cache.update(new)
            if self.cache_path is not None:
                _append_cache(self.cache_path, new)
        out = []
        for (prompt, items, perm), key in zip(canon, keys):
            rec = self._cache[key]
            out.append((rec, perm if kind == "list" else perm[0] == 1))
        return out

    def _count(self, n: int, agrees: list[bool | None], flipped: bool, tie: bool) -> None:
        self.stats.judgements += n
        decided = [a for a in agrees if a is not None]
        self.stats.comparisons += len(decided)
        self.stats.agree += sum(decided)
        self.stats.flipped += int(flipped)
        self.stats.ties += int(tie)


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    cache = {}
    with path.open("r", encoding="utf-8") as f:
        for text in f:
            try:
                entry = json.loads(text)
                cache[entry["key"]] = entry["label"]
            except (json.JSONDecodeError, KeyError, TypeError):
                # A run killed mid-append leaves a partial last line; that label is redrawn.
                continue
    return cache


def _append_cache(path: Path, new: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps({"key": k, "label": v}) + "\n" for k, v in new.items()))
