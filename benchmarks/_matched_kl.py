"""The analysis behind ``online_vs_offline.py``: gold-vs-KL frontiers, the comparison of two
methods at matched KL, the Markdown tables and the plot. Pure functions of the runs' rows
(``{"method", "beta", "seed", "labels", "gold", "kl", "win_rate_gold"}``) so that a test can
check them by hand.

A method's *frontier* is the piecewise-linear curve through its (KL, gold) points sorted by KL,
one point per β. Two frontiers are compared at ``MATCHED_POINTS`` KL values evenly spread over
the KL range both cover (none when the ranges are disjoint: no extrapolation):

- on the *mean* frontiers (each β's point the mean over seeds of its KL and its gold);
- *per seed*: each seed's own two frontiers (its runs only) at the same KL values, where that
  seed's frontiers both cover the value; the mean ± 95% t-interval over those seeds;
- each seed's *gap*: the mean of online − offline gold at ``MATCHED_POINTS`` values spread over
  that seed's own common KL range, so every seed with overlapping frontiers gives one number;
  their mean ± 95% t-interval over seeds is the headline interval.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

METHODS = ("offline", "online")
MATCHED_POINTS = 5
Row = dict[str, Any]
Point = tuple[float, float]


def t_interval(values: list[float]) -> tuple[float, float, int]:
    """Mean, 95% t half-width (NaN with one value) and count of the non-NaN ``values``."""
    from alignlab.eval.intervals import t_interval as interval

    ci = interval(values)
    return ci.mean, ci.half_width, ci.n


def frontier_at(points: list[Point], kl: float) -> float:
    """Gold at ``kl`` on the piecewise-linear frontier through ``points`` (sorted by KL)."""
    pts = sorted(points)
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return g0 if k1 == k0 else g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    if len(pts) == 1 and pts[0][0] == kl:
        return pts[0][1]
    raise ValueError(f"KL {kl} outside the frontier {pts}")


def covers(points: list[Point], kl: float) -> bool:
    return bool(points) and min(p[0] for p in points) <= kl <= max(p[0] for p in points)


def overlap(a: list[Point], b: list[Point]) -> tuple[float, float] | None:
    """The KL range both frontiers cover, or None."""
    if not a or not b:
        return None
    lo = max(min(p[0] for p in a), min(p[0] for p in b))
    hi = min(max(p[0] for p in a), max(p[0] for p in b))
    return (lo, hi) if lo <= hi else None


def spread(lo: float, hi: float, n: int = MATCHED_POINTS) -> list[float]:
    return [lo] if hi == lo else [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def mean_frontiers(rows: list[Row]) -> dict[str, list[Point]]:
    """Each method's frontier through its per-β means over seeds of (KL, gold)."""
    out = {}
    for m in METHODS:
        betas = sorted({r["beta"] for r in rows if r["method"] == m})
        pts = []
        for b in betas:
            sel = [r for r in rows if r["method"] == m and r["beta"] == b]
            pts.append((statistics.fmean(r["kl"] for r in sel),
                        statistics.fmean(r["gold"] for r in sel)))
        out[m] = sorted(pts)
    return out


def seed_frontiers(rows: list[Row], seed: int) -> dict[str, list[Point]]:
    return {m: sorted((r["kl"], r["gold"]) for r in rows
                      if r["method"] == m and r["seed"] == seed) for m in METHODS}


def gap(front: dict[str, list[Point]], kls: list[float]) -> list[float]:
    """Online − offline gold at each of ``kls`` (all inside both frontiers)."""
    return [frontier_at(front["online"], k) - frontier_at(front["offline"], k) for k in kls]


def matched_kl(rows: list[Row]) -> dict[str, Any]:
    """The comparison of the module docstring: ``kls`` (empty without overlap), ``offline`` and
    ``online`` gold on the mean frontiers there, ``diff`` their difference, ``per_seed`` (one
    (mean, half-width, n) per KL value), ``seed_gaps`` ({seed: gap}) and ``gap`` (mean,
    half-width, n) over the seeds."""
    fronts = mean_frontiers(rows)
    ov = overlap(fronts["offline"], fronts["online"])
    kls = spread(*ov) if ov else []
    seeds = sorted({r["seed"] for r in rows})
    per_seed_fronts = {s: seed_frontiers(rows, s) for s in seeds}
    per_seed = []
    for k in kls:
        diffs = [gap(f, [k])[0] for f in per_seed_fronts.values()
                 if covers(f["offline"], k) and covers(f["online"], k)]
        per_seed.append(t_interval(diffs) if diffs else (math.nan, math.nan, 0))
    seed_gaps = {}
    for s, f in per_seed_fronts.items():
        own = overlap(f["offline"], f["online"])
        if own:
            seed_gaps[s] = statistics.fmean(gap(f, spread(*own)))
    return {"kls": kls, "offline": [frontier_at(fronts["offline"], k) for k in kls],
            "online": [frontier_at(fronts["online"], k) for k in kls],
            "diff": gap(fronts, kls), "per_seed": per_seed, "seed_gaps": seed_gaps,
            "gap": t_interval(list(seed_gaps.values())) if seed_gaps else (math.nan, math.nan, 0),
            "fronts": fronts, "n_seeds": len(seeds)}


def _pm(mean: float, half: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if not math.isnan(half) else f"{mean:.{digits}f}"


def method_table(rows: list[Row]) -> list[str]:
    lines = ["| method | β | labels | gold | KL to base (nats) | gold win rate vs base |",
             "|---|---|---|---|---|---|"]
    for m in METHODS:
        for b in sorted({r["beta"] for r in rows if r["method"] == m}):
            sel = [r for r in rows if r["method"] == m and r["beta"] == b]
            g, k, w = (t_interval([r[key] for r in sel]) for key in ("gold", "kl", "win_rate_gold"))
            labels = statistics.fmean(r["labels"] for r in sel)
            lines.append(f"| {m} | {b:g} | {labels:.0f} | {_pm(g[0], g[1], 3)} | "
                         f"{_pm(k[0], k[1], 2)} | {_pm(w[0], w[1], 3)} |")
    return lines


def matched_table(mk: dict[str, Any]) -> list[str]:
    if not mk["kls"]:
        return ["the two mean frontiers cover no common KL range: no matched-KL comparison"]
    lines = ["| KL (nats) | offline gold | online gold | online − offline (mean frontiers) | "
             "online − offline per seed (seeds covering) |", "|---|---|---|---|---|"]
    for k, off, on, d, (pm, ph, n) in zip(mk["kls"], mk["offline"], mk["online"], mk["diff"],
                                          mk["per_seed"]):
        per = f"{_pm(pm, ph, 3)} ({n})" if n else "— (0)"
        lines.append(f"| {k:.2f} | {off:.3f} | {on:.3f} | {d:+.3f} | {per} |")
    return lines


def verdict(mk: dict[str, Any]) -> str:
    g, h, n = mk["gap"]
    if n == 0:
        return "no seed's two frontiers overlap in KL: no per-seed matched-KL gap"
    head = (f"online − offline gold at matched KL, each seed over its own common KL range: "
            f"{_pm(g, h, 3)} (95% t-interval over the {n} of {mk['n_seeds']} seeds whose "
            "frontiers overlap)")
    if n < 2 or math.isnan(h):
        return head + ": too few seeds for an interval"
    if g - h > 0:
        return head + ": online ahead"
    if g + h < 0:
        return head + ": offline ahead"
    return head + ": the interval contains 0, neither method is ahead at this budget"


def plot(rows: list[Row], mk: dict[str, Any], base_gold: float, paths: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, color in zip(METHODS, ("C0", "C1")):
        own = [r for r in rows if r["method"] == m]
        ax.scatter([r["kl"] for r in own], [r["gold"] for r in own], s=8, color=color, alpha=0.25,
                   label=f"{m}, one run")
        for b in sorted({r["beta"] for r in own}):
            sel = [r for r in own if r["beta"] == b]
            g, gh, _ = t_interval([r["gold"] for r in sel])
            k, kh, _ = t_interval([r["kl"] for r in sel])
            ax.errorbar(k, g, xerr=None if math.isnan(kh) else kh,
                        yerr=None if math.isnan(gh) else gh, fmt="o", color=color, capsize=3)
            ax.annotate(f"β={b:g}", (k, g), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)
        ax.plot(*zip(*mk["fronts"][m]), "-", color=color, label=f"{m} (mean over seeds per β)")
        if mk["kls"]:
            ax.plot(mk["kls"], mk[m], "x", color=color, ms=8, mew=2)
    if mk["kls"]:
        ax.axvspan(mk["kls"][0], mk["kls"][-1], color="grey", alpha=0.12,
                   label="matched KL (× compared)")
    ax.axhline(base_gold, color="grey", ls=":", label="base model")
    ax.set_xlabel("KL(π ‖ π_base), nats (Monte-Carlo)")
    ax.set_ylabel("gold reward (VADER)")
    ax.set_title("Online vs offline DPO at equal labels (95% t-intervals over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120)
    plt.close(fig)


def summary_line(mk: dict[str, Any], seconds: float) -> str:
    diffs = mk["diff"]
    lo, hi = (mk["kls"][0], mk["kls"][-1]) if mk["kls"] else (math.nan, math.nan)
    g, h, n = mk["gap"]
    return (f"online_minus_offline_gold_at_matched_kl="
            f"{statistics.fmean(diffs) if diffs else math.nan:.4f} "
            f"kl_overlap_low={lo:.3f} kl_overlap_high={hi:.3f} "
            f"per_seed_gap_mean={g:.4f} per_seed_gap_ci95={h:.4f} per_seed_gap_seeds={n} "
            f"seeds={mk['n_seeds']} seconds={seconds:.0f}")
