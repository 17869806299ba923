"""Preference data from a model: sample completions on a task's train prompts, label, write rows.

Online-to-offline, as in AlpacaFarm (Dubois et al. 2023): a policy (usually the SFT model)
samples ``samples_per_prompt`` completions per prompt and a :class:`SimulatedAnnotator` labels
them, giving rows in the data layer's formats:

- ``preference``: disjoint pairs (0, 1), (2, 3), … of a prompt's samples → prompt/chosen/rejected
  (``margin`` = gold(chosen) − gold(rejected) when asked: oracle information, negative on
  flipped pairs; ``tie: true`` on pairs the annotator calls a tie);
- ``unpaired``: every sample → prompt/completion/label (desirable = noisy gold above threshold);
- ``ranked``: a prompt's distinct samples → prompt/completions/scores (a noisy Plackett-Luce
  ranking).

:func:`rso_pairs` instead builds pairs by statistical rejection sampling (Liu et al. 2023,
"Statistical Rejection Sampling Improves Preference Optimization"): from ``n_candidates``
samples per prompt, accept with probability ``exp((r − r_max)/β)`` and pair the accepted ones
by reward. Empty completions and pairs of identical completions carry no preference: they are
dropped and counted.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

from alignlab.core.errors import ConfigError
from alignlab.rewards.annotator import SimulatedAnnotator
from alignlab.rewards.judges import AnnotatorJudge, judge_pairs
from alignlab.rewards.rso import build_pairs, statistical_rejection_sampling
from alignlab.rollout.sampling import sample

GenFormat = Literal["preference", "unpaired", "ranked"]
GEN_FORMATS = ("preference", "unpaired", "ranked")
RewardFn = Callable[[list[str], list[str]], list[float]]
# Sampling rounds before giving up on reaching ``n`` rows (a policy that keeps emitting empty
# or identical completions would otherwise loop forever).
MAX_ROUNDS = 20


class PreferenceRows(list):
    """A list of row dicts in ``format``, with ``stats``: counts and gold means of how it was made."""

    def __init__(self, rows: list[dict[str, Any]], format: str, stats: dict[str, Any]):
        super().__init__(rows)
        self.format = format
        self.stats = stats


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _sample_rounds(model, tokenizer, task, n: int, rows_per_prompt: float, k: int, seed: int,
                   sampling: dict[str, Any], make_rows: Callable[[list[str], list[list[str]], int], list],
                   counts: Counter) -> list:
    """Sample ``k`` completions per train prompt, round after round, until ``make_rows`` has ``n`` rows.

    Prompts are the task's train prompts in a seeded order, cycled; each round samples with its
    own seed, so a prompt seen twice gets fresh completions."""
    prompts = list(task.train_prompts)
    random.Random(seed).shuffle(prompts)
    rows: list = []
    cursor = 0
    for round_ in range(MAX_ROUNDS):
        need = n - len(rows)
        if need <= 0:
            break
        n_prompts = max(1, math.ceil(need / rows_per_prompt))
        chunk = [prompts[(cursor + i) % len(prompts)] for i in range(n_prompts)]
        cursor += n_prompts
        s = sample(model, tokenizer, chunk, n=k, seed=seed * 1_000_003 + round_, **sampling)
        groups = []
        for i in range(n_prompts):
            comps = s.completions[i * k:(i + 1) * k]
            kept = [c for c in comps if c.strip()]
            counts["dropped_empty"] += len(comps) - len(kept)
            groups.append(kept)
        counts["prompts_sampled"] += n_prompts
        counts["samples"] += n_prompts * k
        counts["rounds"] = round_ + 1
        rows.extend(make_rows(chunk, groups, need))
    counts["shortfall"] = max(0, n - len(rows))
    return rows[:n]


def _sampling(task, temperature: float, top_p: float, top_k: int, max_new_tokens: int | None,
              batch_size: int) -> dict[str, Any]:
    return dict(temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size,
                max_new_tokens=max_new_tokens or task.max_new_tokens)


def generate_preferences(model, tokenizer, task, n: int, *, samples_per_prompt: int = 2,
                         annotator: SimulatedAnnotator | None = None, seed: int = 0,
                         format: GenFormat = "preference", margin: bool = False,
                         threshold: float | None = None, temperature: float = 1.0,
                         top_p: float = 1.0, top_k: int = 0, max_new_tokens: int | None = None,
                         batch_size: int = 64) -> PreferenceRows:
    """``n`` rows of ``format`` labelled by ``annotator`` (default: the task's gold, 25% flips).

    ``threshold`` (unpaired only) defaults to the median gold of the first round's samples,
    so about half the completions are desirable."""
    if format not in GEN_FORMATS:
        raise ConfigError(f"format: got {format!r}; allowed values: {', '.join(GEN_FORMATS)}")
    if n < 1:
        raise ConfigError(f"n must be positive, got {n}")
    if format != "unpaired" and samples_per_prompt < 2:
        raise ConfigError(f"samples_per_prompt must be >= 2 for format {format!r}, got {samples_per_prompt}")
    if samples_per_prompt < 1:
        raise ConfigError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    annotator = annotator or SimulatedAnnotator.for_task(task, seed=seed)
    before = replace(annotator.stats)
    counts: Counter = Counter()
    golds: dict[str, list[float]] = {"better": [], "worse": []}
    k = samples_per_prompt
    state: dict[str, Any] = {"threshold": threshold}

    judge = AnnotatorJudge(annotator)

    def pairs(prompts, groups, need):
        rows = []
        for pair in judge_pairs(prompts, groups, judge, limit=need, counts=counts):
            lab, comps = pair.verdict.detail, groups[pair.group]
            row = {"prompt": prompts[pair.group], "chosen": comps[pair.chosen],
                   "rejected": comps[pair.rejected]}
            a_wins = pair.chosen == pair.a
            g_c, g_r = (lab.gold_a, lab.gold_b) if a_wins else (lab.gold_b, lab.gold_a)
            if margin:
                row["margin"] = g_c - g_r
            if lab.a_preferred is None:
                row["tie"] = True
            else:
                golds["better"].append(g_c)
                golds["worse"].append(g_r)
            rows.append(row)
        return rows

    def points(prompts, groups, need):
        flat = [(p, c) for p, comps in zip(prompts, groups) for c in comps][:need]
        if not flat:
            return []
        ps, cs = [list(x) for x in zip(*flat)]
        if state["threshold"] is None:
            state["threshold"] = statistics.median(task.gold(ps, cs))
        labels = annotator.label_points(ps, cs, threshold=state["threshold"])
        for lab in labels:
            golds["better" if lab.label else "worse"].append(lab.gold)
        return [{"prompt": p, "completion": c, "label": lab.label} for p, c, lab in zip(ps, cs, labels)]

    def lists(prompts, groups, need):
        queries = []
        for p, comps in zip(prompts, groups):
            distinct = list(dict.fromkeys(comps))
            counts["dropped_identical"] += len(comps) - len(distinct)
            if len(distinct) >= 2:
                queries.append((p, distinct))
            else:
                counts["dropped_lists"] += 1
        queries = queries[:need]
        labels = annotator.rank([q[0] for q in queries], [q[1] for q in queries]) if queries else []
        for lab in labels:
            golds["better"].append(lab.gold[lab.order[0]])
            golds["worse"].append(lab.gold[lab.order[-1]])
        return [{"prompt": p, "completions": cs, "scores": lab.scores} for (p, cs), lab in zip(queries, labels)]

    make_rows, per_prompt = {"preference": (pairs, k // 2), "unpaired": (points, k), "ranked": (lists, 1)}[format]
    rows = _sample_rounds(model, tokenizer, task, n, per_prompt, k, seed,
                          _sampling(task, temperature, top_p, top_k, max_new_tokens, batch_size),
                          make_rows, counts)
    names = {"preference": ("chosen", "rejected"), "unpaired": ("desirable", "undesirable"),
             "ranked": ("top", "bottom")}[format]
    stats = {"rows": len(rows), "format": format, "task": task.name, **dict(counts),
             f"gold_{names[0]}_mean": _mean(golds["better"]), f"gold_{names[1]}_mean": _mean(golds["worse"]),
             "annotator": (annotator.stats - before).as_dict()}
    if format == "unpaired":
        stats["threshold"] = state["threshold"]
    return PreferenceRows(rows, format, stats)


def rso_pairs(model, tokenizer, task, n: int, *, n_candidates: int = 8, n_accept: int = 4,
              beta: float = 0.5, reward: RewardFn | None = None,
              mode: Literal["first_round", "tournament", "all"] = "first_round", seed: int = 0,
              margin: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
              max_new_tokens: int | None = None, batch_size: int = 64) -> PreferenceRows:
    """``n`` preference rows from RSO: rejection-sample ``n_accept`` of ``n_candidates`` per prompt
    towards ``π*(y) ∝ π(y)·exp(r(y)/β)``, pair them by ``reward`` (default: the task's gold).

    ``margin`` writes the reward gap r(chosen) − r(rejected)."""
    if n < 1:
        raise ConfigError(f"n must be positive, got {n}")
    if n_candidates < 2 or not 2 <= n_accept <= n_candidates:
        raise ConfigError(f"need 2 <= n_accept <= n_candidates, got n_accept={n_accept}, "
                          f"n_candidates={n_candidates}")
    gold_is_reward = reward is None
    reward = reward or task.gold
    counts: Counter = Counter()
    golds: dict[str, list[float]] = {"better": [], "worse": []}
    per_prompt = {"first_round": n_accept // 2, "tournament": n_accept - 1,
                  "all": n_accept * (n_accept - 1) // 2}[mode]

    def make_rows(prompts, groups, need):
        rows = []
        for p, comps in zip(prompts, groups):
            distinct = list(dict.fromkeys(comps))
            counts["dropped_identical"] += len(comps) - len(distinct)
            if len(distinct) < 2:
                continue
            r = reward([p] * len(distinct), distinct)
            g = r if gold_is_reward else task.gold([p] * len(distinct), distinct)
            pair_seed = seed * 1_000_003 + counts["rso_prompts"]
            counts["rso_prompts"] += 1
            accepted = statistical_rejection_sampling(r, beta, n_accept, seed=pair_seed)
            counts["accepted"] += len(accepted)
            for c, j in build_pairs(r, accepted, mode=mode).tolist():
                if len(rows) == need:
                    return rows
                row = {"prompt": p, "chosen": distinct[c], "rejected": distinct[j]}
                if margin:
                    row["margin"] = float(r[c] - r[j])
                golds["better"].append(g[c])
                golds["worse"].append(g[j])
                rows.append(row)
        return rows

    rows = _sample_rounds(model, tokenizer, task, n, max(per_prompt, 1), n_candidates, seed,
                          _sampling(task, temperature, top_p, top_k, max_new_tokens, batch_size),
                          make_rows, counts)
    stats = {"rows": len(rows), "format": "preference", "task": task.name, "rso_beta": beta, **dict(counts),
             "gold_chosen_mean": _mean(golds["better"]), "gold_rejected_mean": _mean(golds["worse"])}
    return PreferenceRows(rows, "preference", stats)
