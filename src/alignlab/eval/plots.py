"""PNG plots of runs (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_before_after(results: dict[str, dict[str, Any]], curves: dict[str, list[tuple[int, float]]],
                      path: str | Path, *, metrics: tuple[str, ...] = ("gold_mean", "distinct_2", "hit_length_limit"),
                      title: str = "alignlab demo") -> Path:
    """Left: the chosen eval metrics per stage; right: training curves (step, value)."""
    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(results)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        vals = [results[label]["metrics"].get(m, 0.0) for m in metrics]
        bars = ax_bar.bar([j + i * width for j in range(len(metrics))], vals, width, label=label)
        ax_bar.bar_label(bars, fmt="%.2f", fontsize=8)
    ax_bar.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(metrics))], metrics)
    ax_bar.axhline(0, color="black", linewidth=0.5)
    ax_bar.set_title("eval on held-out prompts")
    ax_bar.legend()
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax_curve.plot(xs, ys, label=name)
    ax_curve.set_xlabel("step")
    ax_curve.set_title("training")
    ax_curve.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
