"""Oracle preference rows from the world's review grammar: chosen = an all-positive completion,
rejected = an all-negative one for the same prompt (and unpaired / ranked / column variants)."""

from __future__ import annotations

import random
from typing import Any

from alignlab.core.errors import ConfigError
from alignlab.world import language as lang


def world_preference_rows(task: Any, fmt: str, n: int, seed: int = 0, list_size: int = 4,
                          columns: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``n`` oracle rows of ``fmt`` on the task's train prompts (review tasks only).

    ``preference``: chosen all-positive (p=1), rejected all-negative (p=0); ``unpaired``: one
    completion, positive or negative with equal odds, labelled by it; ``ranked``: ``list_size``
    completions at evenly spaced positivity p, scored by p. ``columns`` (``tie``, ``group``,
    ``reward``) asks for rows that carry them (:func:`world_column_rows`)."""
    by_text = {p.text: p for p in lang.all_review_prefixes()}
    prefixes = [by_text[t] for t in task.train_prompts if t in by_text]
    if not prefixes:
        raise ConfigError(f"data.source world:{task.name}: preference rows can be built only for "
                          "review tasks (positive, positive_short)")
    rng = random.Random(seed)
    if columns:
        return world_column_rows(task, prefixes, fmt, n, rng, set(columns))
    rows = []
    for _ in range(n):
        prefix = rng.choice(prefixes)
        if fmt == "preference":
            rows.append({"prompt": prefix.text, "chosen": lang.complete_review(rng, prefix, 1.0),
                         "rejected": lang.complete_review(rng, prefix, 0.0)})
        elif fmt == "unpaired":
            good = rng.random() < 0.5
            rows.append({"prompt": prefix.text, "label": good,
                         "completion": lang.complete_review(rng, prefix, 1.0 if good else 0.0)})
        elif fmt == "ranked":
            ps = [1.0 - i / (list_size - 1) for i in range(list_size)]
            rows.append({"prompt": prefix.text, "scores": ps,
                         "completions": [lang.complete_review(rng, prefix, p) for p in ps]})
        else:
            raise ConfigError(f"data.format: world rows exist for preference, unpaired and "
                              f"ranked, not {fmt!r}")
    return rows


def world_column_rows(task: Any, prefixes: list[Any], fmt: str, n: int, rng: random.Random,
                      columns: set[str]) -> list[dict[str, Any]]:
    """Oracle rows carrying ``columns`` on the world's review prompts (see
    :func:`world_preference_rows`).

    ``group``: a quarter of the pairs form the ``hard`` group (chosen at positivity 0.75,
    rejected at 0.25, so some pairs are mislabelled), the rest ``easy`` (1 vs 0); ``tie``: a
    quarter of the pairs are two completions of the same sentiment (both positive or both
    negative); ``reward`` (unpaired): a completion at positivity 0, ¼, ½, ¾ or 1 with the task's
    gold reward (and ``label`` = reward > 0)."""
    rows = []
    for _ in range(n):
        prefix = rng.choice(prefixes)
        if fmt == "unpaired":
            completion = lang.complete_review(rng, prefix, rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]))
            rows.append({"prompt": prefix.text, "completion": completion})
            continue
        row: dict[str, Any] = {"prompt": prefix.text}
        p_chosen, p_rejected = 1.0, 0.0
        if "group" in columns:
            hard = rng.random() < 0.25
            row["group"] = "hard" if hard else "easy"
            p_chosen, p_rejected = (0.75, 0.25) if hard else (1.0, 0.0)
        if "tie" in columns:
            row["tie"] = rng.random() < 0.25
            if row["tie"]:
                p_chosen = p_rejected = rng.choice([0.0, 1.0])
        row["chosen"] = lang.complete_review(rng, prefix, p_chosen)
        row["rejected"] = lang.complete_review(rng, prefix, p_rejected)
        rows.append(row)
    if fmt == "unpaired":
        gold = task.gold([r["prompt"] for r in rows], [r["completion"] for r in rows])
        for row, g in zip(rows, gold):
            row["reward"], row["label"] = float(g), g > 0
    return rows
