"""The results of a run: every finished cell's ``eval.json``, and one row per (task, algorithm,
sweep point) with each metric's mean over seeds and 95% Student-t interval
(``eval/intervals.py``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignlab.eval.intervals import Interval, t_interval

# (metric key, column title); pass@k columns are added for the ks present.
METRICS = [("gold_mean", "gold"), ("proxy_mean", "proxy"), ("kl_to_ref", "KL(π‖ref)"),
           ("win_rate_gold", "win (gold BT)"), ("win_rate_annotator", "win (annotator)"),
           ("length_words", "length (words)"), ("distinct_2", "distinct-2"),
           ("self_bleu", "self-BLEU"), ("ppl_base", "ppl (base)")]


@dataclass
class Row:
    task: str
    name: str
    algorithm: str
    setting: str
    sweep: dict[str, Any]
    seeds: list[int]
    values: dict[str, Interval] = field(default_factory=dict)
    kl_estimator: str = ""


def load_cells(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished cell's ``eval.json`` under ``run_dir/cells``."""
    run_dir = Path(run_dir)
    cells = []
    for path in sorted((run_dir / "cells").glob("*/*/*/seed_*/eval.json")):
        if (path.parent / "DONE").exists():
            rec = json.loads(path.read_text(encoding="utf-8"))
            rec["setting"] = path.parent.parent.name
            cells.append(rec)
    return cells


def aggregate(cells: list[dict[str, Any]], task_order: list[str] | None = None) -> list[Row]:
    """One row per (task, algorithm name, sweep point), metrics as intervals over seeds; tasks
    in ``task_order`` (the suite's) then by name, a task's rows by mean gold reward, best first."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["cell"]["task"], c["cell"]["name"], c["setting"]), []).append(c)
    rows = []
    for (task, name, setting), members in groups.items():
        keys = list(dict.fromkeys(k for m in members for k in m["metrics"]))
        first = members[0]["cell"]
        rows.append(Row(task, name, first["algorithm"], setting, first["sweep"],
                        sorted(m["cell"]["seed"] for m in members),
                        {k: t_interval([m["metrics"].get(k, math.nan) for m in members]) for k in keys},
                        members[0].get("kl_estimator", "")))
    tasks = list(dict.fromkeys([*(task_order or []), *sorted(r.task for r in rows)]))
    return sorted(rows, key=lambda r: (tasks.index(r.task), -_mean(r, "gold_mean")))


def _mean(row: Row, key: str) -> float:
    iv = row.values.get(key)
    return iv.mean if iv is not None and not math.isnan(iv.mean) else -math.inf


def columns(rows: list[Row]) -> list[tuple[str, str]]:
    present = {k for r in rows for k in r.values}
    cols = [(k, t) for k, t in METRICS if k in present]
    ks = sorted({int(k.rsplit("_", 1)[1]) for k in present if k.startswith("pass_at_")})
    return cols + [(f"pass_at_{k}", f"pass@{k}") for k in ks]


def ranking_agreement(rows: list[Row], task: str) -> tuple[float, int]:
    """Spearman's ρ between the annotator's and gold Bradley-Terry win rates over a task's rows
    that have both (AlpacaFarm's check), and how many rows that is."""
    from alignlab.eval.ranking import spearman

    both = [r for r in rows if r.task == task and not math.isnan(_mean_or_nan(r, "win_rate_annotator"))
            and not math.isnan(_mean_or_nan(r, "win_rate_gold"))]
    rho = spearman([_mean_or_nan(r, "win_rate_annotator") for r in both],
                   [_mean_or_nan(r, "win_rate_gold") for r in both])
    return rho, len(both)


def _mean_or_nan(row: Row, key: str) -> float:
    iv = row.values.get(key)
    return math.nan if iv is None else iv.mean
