"""The bench's PNG plots, one set per task (matplotlib, headless):

- ``frontier``: gold reward against KL(π‖ref), one curve per algorithm through its sweep points,
  95% intervals over seeds as error bars on both axes; the reference at KL 0;
- ``overoptimisation``: gold (left) and proxy (right) reward against KL per algorithm — Gao et
  al. 2023's picture: the proxy keeps rising while gold rises, then falls;
- ``win_rates``: win rate against the reference by gold Bradley-Terry and by the annotator,
  with intervals; ½ marked.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

from alignlab.bench.results import Row

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CAPTIONS = {
    "frontier": "gold reward vs KL(π‖ref): one curve per algorithm, points = sweep values, "
                "bars = 95% intervals over seeds",
    "overoptimisation": "gold and proxy reward over KL(π‖ref) (over-optimisation)",
    "win_rates": "win rate against the reference: gold Bradley-Terry and simulated annotator, "
                 "95% intervals over seeds",
}


def _m(row: Row, key: str) -> float:
    iv = row.values.get(key)
    return math.nan if iv is None else iv.mean


def _e(row: Row, key: str) -> float:
    iv = row.values.get(key)
    return 0.0 if iv is None or math.isnan(iv.half_width) else iv.half_width


def _curves(rows: list[Row], y: str) -> dict[str, list[Row]]:
    """Rows per algorithm name that have KL and ``y``, ordered by KL."""
    out: dict[str, list[Row]] = {}
    for r in rows:
        if not math.isnan(_m(r, "kl_to_ref")) and not math.isnan(_m(r, y)):
            out.setdefault(r.name, []).append(r)
    return {k: sorted(v, key=lambda r: _m(r, "kl_to_ref")) for k, v in out.items()}


def _plot_curves(ax, rows: list[Row], y: str, ylabel: str) -> None:
    for name, pts in _curves(rows, y).items():
        marker = "*" if name == "reference" else "o"
        ax.errorbar([_m(r, "kl_to_ref") for r in pts], [_m(r, y) for r in pts],
                    xerr=[_e(r, "kl_to_ref") for r in pts], yerr=[_e(r, y) for r in pts],
                    marker=marker, markersize=10 if marker == "*" else 5, capsize=3, label=name)
        if len(pts) > 1:
            for r in pts:
                ax.annotate(r.setting, (_m(r, "kl_to_ref"), _m(r, y)), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("KL(π‖ref), nats per completion")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def frontier(rows: list[Row], task: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _plot_curves(ax, rows, "gold_mean", "gold reward")
    ax.set_title(f"{task}: gold reward–KL frontier")
    ax.legend(fontsize=8)
    return _save(fig, path)


def overoptimisation(rows: list[Row], task: str, path: Path) -> Path:
    fig, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    _plot_curves(ax_gold, rows, "gold_mean", "gold reward")
    _plot_curves(ax_proxy, rows, "proxy_mean", "proxy reward (reward model)")
    ax_gold.set_title("gold")
    ax_proxy.set_title("proxy")
    ax_proxy.legend(fontsize=8)
    fig.suptitle(f"{task}: proxy vs gold reward over KL")
    return _save(fig, path)


def win_rates(rows: list[Row], task: str, path: Path) -> Path:
    kept = [r for r in rows if not math.isnan(_m(r, "win_rate_gold"))]
    labels = [f"{r.name} {r.setting}" if r.setting != "default" else r.name for r in kept]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(kept) + 1.5))
    ys = range(len(kept))
    h = 0.4
    ax.barh([y - h / 2 for y in ys], [_m(r, "win_rate_gold") for r in kept], h,
            xerr=[_e(r, "win_rate_gold") for r in kept], capsize=3, label="gold Bradley-Terry")
    if any(not math.isnan(_m(r, "win_rate_annotator")) for r in kept):
        ax.barh([y + h / 2 for y in ys], [_m(r, "win_rate_annotator") for r in kept], h,
                xerr=[_e(r, "win_rate_annotator") for r in kept], capsize=3, label="annotator")
    ax.invert_yaxis()  # the leaderboard order, best on top
    ax.axvline(0.5, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate against the reference")
    ax.set_title(f"{task}: win rates")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_all(rows: list[Row], out_dir: Path) -> dict[str, dict[str, Path]]:
    """task → {plot kind → PNG path}; the over-optimisation plot only where a proxy exists."""
    out: dict[str, dict[str, Path]] = {}
    for task in dict.fromkeys(r.task for r in rows):
        mine = [r for r in rows if r.task == task]
        per = {"frontier": frontier(mine, task, out_dir / f"frontier_{task}.png")}
        if any(not math.isnan(_m(r, "proxy_mean")) for r in mine):
            per["overoptimisation"] = overoptimisation(mine, task, out_dir / f"overoptimisation_{task}.png")
        per["win_rates"] = win_rates(mine, task, out_dir / f"win_rates_{task}.png")
        out[task] = per
    return out
