"""The paper-findings table (issue 13): per published finding, the numbers a bench run gives and
whether alignlab reproduced it, from the report's rows (means over seeds, ``results.py``) and,
for paired per-seed differences, the cells' own values.

- A *curve* of an algorithm name: its sweep points' (KL, gold, proxy), each the mean over seeds,
  sorted by KL; for the over-optimisation findings (2–4) it starts at the reference cell (KL 0)
  when the run has one. Its *peak* is the point of highest mean gold, its *last* the point of
  largest KL, its *drop* peak − last gold, per seed (that seed's two cells), with the 95%
  Student-t interval over seeds.
- Two *frontiers* (piecewise-linear through each name's (KL, gold) points, no reference) are
  compared at *matched KL*: at ``MATCHED_POINTS`` KL values spread evenly over the range both
  cover, never extrapolated; on the mean frontiers, and per seed (each seed's own frontiers over
  their own common range, the mean gap a seed), with the t-interval over seeds of those gaps.
- An interval is *above 0* when its low end is > 0, *below 0* when its high end is < 0 (two seeds
  at least; one seed has no interval and decides nothing).

Verdicts: ``reproduced``, ``not reproduced``, ``inconclusive``, ``not in this run`` (its cells are
missing). A finding made of several comparisons is reproduced (not reproduced) only when every
comparison is, else inconclusive. Each finding's rule is in ``FINDINGS`` and in the output.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from alignlab.bench.results import Row, ranking_agreement
from alignlab.eval.intervals import Interval, t_interval

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, ABSENT = (
    "reproduced", "not reproduced", "inconclusive", "not in this run")
MATCHED_POINTS = 5
MIN_SPEARMAN, MIN_RANKED = 0.8, 5
BY_SIGN = {1: "reproduced", -1: "not reproduced", 0: "inconclusive"}
PESSIMISTIC = [("best_of_n_mean_minus_std", "best_of_n"), ("best_of_n_min", "best_of_n"),
               ("grpo_mean_minus_std", "grpo_proxy")]

_FALL_RULE = ("per curve (from the reference): fewer than 3 points → inconclusive; the peak at "
              "the largest KL → not reproduced (no fall); the drop's interval not above 0 → "
              "inconclusive")
_GAP_RULE = ("gold at matched KL, per-seed interval above 0 → reproduced, below 0 → not "
             "reproduced, containing 0, one seed, or no common KL range → inconclusive")
FINDINGS = {  # number → (title, the paper's claim, the rule)
    1: ("DPO vs PPO frontier",
        "DPO's gold–KL frontier dominates PPO's, even PPO optimising gold (Rafailov et al. 2023).",
        f"DPO − PPO {_GAP_RULE}; against ppo_gold and ppo (those present). Reported, not "
        "decisive: whether DPO's best gold ≥ PPO's best at no more KL."),
    2: ("Over-optimisation of a proxy",
        "Optimising a learned proxy, gold rises then falls with KL while the proxy keeps rising "
        "(Gao et al. 2023).",
        f"{_FALL_RULE}; a drop above 0 with the peak interior and the proxy higher at the last "
        "point than at the peak → reproduced, otherwise (peak at the first point, proxy not "
        "rising) → not reproduced; best_of_n and grpo_proxy."),
    3: ("Pessimistic ensembles",
        "Conservative ensemble objectives (mean − std, min) reduce over-optimisation (Coste et "
        "al. 2024).",
        "per pair, reduction = the mean-aggregate curve's drop − the pessimistic curve's drop, "
        "per seed: the mean aggregate's own drop not above 0 → inconclusive (nothing to "
        "reduce); reduction above 0 → reproduced, below 0 → not reproduced, else inconclusive. "
        "Gold at the largest KL both curves reach: reported, not decisive."),
    4: ("DAAs over-optimise",
        "Direct alignment algorithms over-optimise too: at high KL gold falls below its peak "
        "(Rafailov et al. 2024).",
        f"{_FALL_RULE}; a drop above 0 → reproduced; dpo, ipo, slic."),
    5: ("Online vs offline DPO",
        "At matched KL and equal labels, online DPO reaches higher gold than offline DPO (Tang "
        "et al. 2024).",
        f"online_dpo − dpo {_GAP_RULE}."),
    6: ("Annotator vs gold ranking",
        "A simulated annotator ranks methods as the gold standard does (AlpacaFarm, Dubois et al. "
        "2023: ρ = 0.98).",
        f"Spearman ρ of annotator vs gold win rates over the task's rows: fewer than {MIN_RANKED} "
        f"rows or ρ undefined → inconclusive; ρ ≥ {MIN_SPEARMAN} → reproduced, else not "
        "reproduced."),
}


@dataclass
class Finding:
    number: int
    title: str
    claim: str
    rule: str
    verdict: str
    cells: list[str] = field(default_factory=list)
    """The algorithm names it used (``reference`` included where its curves start there)."""
    details: list[str] = field(default_factory=list)
    """One line per comparison: its numbers and its own verdict."""
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Point:
    setting: str
    kl: float
    gold: float
    proxy: float


class RunView:
    """One task's rows by (name, setting) and its cells' metrics by (name, setting) → seed."""

    def __init__(self, rows: list[Row], cells: list[dict[str, Any]], task: str):
        self.rows = {(r.name, r.setting): r for r in rows if r.task == task}
        self.seeds: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
        for c in cells:
            if c["cell"]["task"] == task:
                key = (c["cell"]["name"], c["setting"])
                self.seeds.setdefault(key, {})[c["cell"]["seed"]] = c["metrics"]

    def has(self, name: str) -> bool:
        return bool(self.curve(name))

    def curve(self, name: str, reference: bool = False) -> list[tuple[str, Point]]:
        names = ["reference", name] if reference and name != "reference" else [name]
        pts = [(n, Point(s, _m(r, "kl_to_ref"), _m(r, "gold_mean"), _m(r, "proxy_mean")))
               for (n, s), r in self.rows.items() if n in names]
        pts = [(n, p) for n, p in pts if not (math.isnan(p.kl) or math.isnan(p.gold))]
        return sorted(pts, key=lambda np: (np[1].kl, np[0] != "reference"))

    def paired(self, a: tuple[str, Point], b: tuple[str, Point], key: str = "gold_mean") -> dict[int, float]:
        """Per seed both cells have: a's value − b's."""
        sa, sb = self.seeds.get((a[0], a[1].setting), {}), self.seeds.get((b[0], b[1].setting), {})
        return {s: sa[s][key] - sb[s][key] for s in sorted(set(sa) & set(sb))
                if key in sa[s] and key in sb[s]}

    def seed_frontier(self, name: str, seed: int) -> list[tuple[float, float]]:
        return sorted((m["kl_to_ref"], m["gold_mean"]) for (n, _), per in self.seeds.items()
                      if n == name and seed in per for m in [per[seed]]
                      if "kl_to_ref" in m and "gold_mean" in m)


def _m(row: Row, key: str) -> float:
    iv = row.values.get(key)
    return math.nan if iv is None else iv.mean


def frontier_at(points: list[tuple[float, float]], kl: float) -> float:
    """Gold at ``kl`` on the piecewise-linear frontier through (KL, gold) ``points``."""
    pts = sorted(points)
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return g0 if k1 == k0 else g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    if pts and pts[0][0] == kl == pts[-1][0]:
        return pts[0][1]
    raise ValueError(f"KL {kl} outside the frontier {pts}: no extrapolation")


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> tuple[float, float] | None:
    if not a or not b:
        return None
    lo, hi = max(min(a)[0], min(b)[0]), min(max(a)[0], max(b)[0])
    return (lo, hi) if lo <= hi else None


def mean_gap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Mean of a − b gold at ``MATCHED_POINTS`` KL values over the common range (NaN if none)."""
    ov = overlap(a, b)
    if ov is None:
        return math.nan
    lo, hi = ov
    # the last point is hi itself: lo + (hi - lo) can round one ulp past the frontier's end
    kls = [lo] if hi == lo else [lo + (hi - lo) * i / (MATCHED_POINTS - 1)
                                 for i in range(MATCHED_POINTS - 1)] + [hi]
    return statistics.fmean(frontier_at(a, k) - frontier_at(b, k) for k in kls)


def sign(iv: Interval) -> int:
    """+1 above 0, −1 below 0, 0 containing 0 or without an interval."""
    if iv.n < 2 or math.isnan(iv.half_width):
        return 0
    return 1 if iv.low > 0 else -1 if iv.high < 0 else 0


def fmt(iv: Interval) -> str:
    if math.isnan(iv.mean):
        return "–"
    ci = "" if math.isnan(iv.half_width) else f" ± {iv.half_width:.3f}"
    return f"{iv.mean:+.3f}{ci} (n={iv.n})"


def _iv(iv: Interval) -> dict[str, Any]:
    return {"mean": iv.mean, "ci95": iv.half_width, "n": iv.n}


def combine(verdicts: list[str]) -> str:
    return verdicts[0] if verdicts and len(set(verdicts)) == 1 else INCONCLUSIVE


def matched(view: RunView, a: str, b: str) -> tuple[str, str, dict[str, Any]]:
    """a − b gold at matched KL: (verdict, line, numbers)."""
    fa, fb = ([(p.kl, p.gold) for _, p in view.curve(n)] for n in (a, b))
    ov = overlap(fa, fb)
    seeds = sorted({s for (n, _), per in view.seeds.items() if n in (a, b) for s in per})
    gaps = [mean_gap(view.seed_frontier(a, s), view.seed_frontier(b, s)) for s in seeds]
    gap = t_interval([g for g in gaps if not math.isnan(g)])
    nums = {"overlap": list(ov) if ov else None, "mean_frontier_gap": mean_gap(fa, fb),
            "per_seed_gap": _iv(gap)}
    if ov is None:
        return INCONCLUSIVE, f"{a} vs {b}: no common KL range ({a} {_span(fa)}, {b} {_span(fb)}) → {INCONCLUSIVE}", nums
    v = BY_SIGN[sign(gap)]
    return v, (f"{a} − {b} gold at matched KL [{ov[0]:.2f}, {ov[1]:.2f}]: {mean_gap(fa, fb):+.3f} "
               f"on the mean frontiers, {fmt(gap)} per seed → {v}"), nums


def _span(f: list[tuple[float, float]]) -> str:
    return f"KL [{f[0][0]:.2f}, {f[-1][0]:.2f}]"


def fall(view: RunView, name: str) -> dict[str, Any]:
    """The curve's peak, last point and drop (peak − last gold per seed)."""
    pts = view.curve(name, reference=True)
    peak, last = max(pts, key=lambda np: np[1].gold), pts[-1]
    return {"points": len(pts), "peak": peak, "last": last, "at": "last" if peak == last else
            "first" if peak == pts[0] else "interior",
            "drop": t_interval(list(view.paired(peak, last).values())), "seed_drops": view.paired(peak, last)}


def _fall_line(name: str, f: dict[str, Any]) -> str:
    (pn, p), (_, last) = f["peak"], f["last"]
    where = "the reference" if pn == "reference" else p.setting
    return (f"{name}: peak gold {p.gold:.3f} at KL {p.kl:.2f} ({where}, {f['at']}), gold "
            f"{last.gold:.3f} at the largest KL {last.kl:.2f}, drop {fmt(f['drop'])}")


def _fall_json(f: dict[str, Any]) -> dict[str, Any]:
    (pn, p), (ln, last) = f["peak"], f["last"]
    return {"peak": {"cell": pn, **asdict(p)}, "last": {"cell": ln, **asdict(last)},
            "peak_at": f["at"], "drop": _iv(f["drop"])}


def _fall_verdict(f: dict[str, Any]) -> str | None:
    """The shared start of findings 2 and 4's rules; None when the drop is above 0."""
    if f["points"] < 3:
        return INCONCLUSIVE
    if f["at"] == "last":
        return NOT_REPRODUCED
    return None if sign(f["drop"]) > 0 else INCONCLUSIVE


def finding_dpo_vs_ppo(view: RunView) -> Finding:
    others = [n for n in ("ppo_gold", "ppo") if view.has(n)]
    if not view.has("dpo") or not others:
        return _absent(1, ["dpo", "ppo_gold", "ppo"])
    verdicts, lines, nums = [], [], {}
    best = max((p for _, p in view.curve("dpo")), key=lambda p: p.gold)
    for other in others:
        v, line, n = matched(view, "dpo", other)
        under = [p.gold for _, p in view.curve(other) if p.kl <= best.kl]
        n["dpo_best"], n["other_best_at_no_more_kl"] = asdict(best), max(under) if under else None
        dom = (f"no {other} point at KL ≤ {best.kl:.2f}" if not under else
               f"DPO's best gold {best.gold:.3f} (KL {best.kl:.2f}) {'≥' if best.gold >= max(under) else '<'} "
               f"{other}'s best at no more KL {max(under):.3f}")
        verdicts.append(v)
        lines.append(f"{line}; {dom}")
        nums[other] = n
    return _finding(1, combine(verdicts), ["dpo", *others], lines, nums)


def finding_overoptimisation(view: RunView) -> Finding:
    names = [n for n in ("best_of_n", "grpo_proxy") if view.has(n)]
    if not names:
        return _absent(2, ["best_of_n", "grpo_proxy"])
    verdicts, lines, nums = [], [], {}
    for name in names:
        f = fall(view, name)
        (_, p), (_, last) = f["peak"], f["last"]
        rose = last.proxy - p.proxy
        v = _fall_verdict(f)
        if v is None:
            v = INCONCLUSIVE if math.isnan(rose) else (
                REPRODUCED if f["at"] == "interior" and rose > 0 else NOT_REPRODUCED)
        verdicts.append(v)
        lines.append(f"{_fall_line(name, f)}; proxy {p.proxy:.3f} at the peak → {last.proxy:.3f} "
                     f"at the largest KL ({'rose' if rose > 0 else 'did not rise'}) → {v}")
        nums[name] = {**_fall_json(f), "proxy_rise": rose, "verdict": v}
    return _finding(2, combine(verdicts), ["reference", *names], lines, nums)


def finding_pessimistic(view: RunView) -> Finding:
    pairs = [(p, b) for p, b in PESSIMISTIC if view.has(p) and view.has(b)]
    if not pairs:
        return _absent(3, sorted({n for pair in PESSIMISTIC for n in pair}))
    verdicts, lines, nums = [], [], {}
    for pess, base in pairs:
        fp, fb = fall(view, pess), fall(view, base)
        common = set(fp["seed_drops"]) & set(fb["seed_drops"])
        red = t_interval([fb["seed_drops"][s] - fp["seed_drops"][s] for s in sorted(common)])
        cp, cb = ([(p.kl, p.gold) for _, p in view.curve(n, reference=True)] for n in (pess, base))
        hi = min(cp[-1][0], cb[-1][0])
        at_hi = (frontier_at(cp, hi), frontier_at(cb, hi)) if overlap(cp, cb) else (math.nan, math.nan)
        if fb["at"] == "last" or sign(fb["drop"]) <= 0:
            v = INCONCLUSIVE
        else:
            v = BY_SIGN[sign(red)]
        verdicts.append(v)
        lines.append(f"{_fall_line(pess, fp)}; {_fall_line(base, fb)}; reduction {fmt(red)}; gold at "
                     f"KL {hi:.2f}: {at_hi[0]:.3f} vs {at_hi[1]:.3f} → {v}")
        nums[f"{pess} vs {base}"] = {pess: _fall_json(fp), base: _fall_json(fb), "reduction": _iv(red),
                                     "largest_common_kl": hi, "gold_at_largest_common_kl":
                                     {pess: at_hi[0], base: at_hi[1]}, "verdict": v}
    return _finding(3, combine(verdicts), ["reference", *dict.fromkeys(n for pr in pairs for n in pr)],
                    lines, nums)


def finding_daa(view: RunView) -> Finding:
    names = [n for n in ("dpo", "ipo", "slic") if view.has(n)]
    if not names:
        return _absent(4, ["dpo", "ipo", "slic"])
    verdicts, lines, nums = [], [], {}
    for name in names:
        f = fall(view, name)
        v = _fall_verdict(f) or REPRODUCED
        verdicts.append(v)
        lines.append(f"{_fall_line(name, f)} → {v}")
        nums[name] = {**_fall_json(f), "verdict": v}
    return _finding(4, combine(verdicts), ["reference", *names], lines, nums)


def finding_online_offline(view: RunView) -> Finding:
    if not (view.has("online_dpo") and view.has("dpo")):
        return _absent(5, ["online_dpo", "dpo"])
    v, line, nums = matched(view, "online_dpo", "dpo")
    return _finding(5, v, ["online_dpo", "dpo"], [line], nums)


def finding_ranking(view: RunView, rows: list[Row], task: str) -> Finding:
    rho, n = ranking_agreement(rows, task)
    if n == 0:
        return _absent(6, ["rows with gold and annotator win rates"])
    v = (INCONCLUSIVE if n < MIN_RANKED or math.isnan(rho) else
         REPRODUCED if rho >= MIN_SPEARMAN else NOT_REPRODUCED)
    names = [r.name for r in rows if r.task == task and not math.isnan(_m(r, "win_rate_annotator"))
             and not math.isnan(_m(r, "win_rate_gold"))]
    rho_s = "–" if math.isnan(rho) else f"{rho:.3f}"
    return _finding(6, v, list(dict.fromkeys(names)), [f"Spearman ρ = {rho_s} over {n} rows → {v}"],
                    {"spearman": rho, "rows": n})


def _finding(number: int, verdict: str, cells: list[str], details: list[str],
             numbers: dict[str, Any]) -> Finding:
    return Finding(number, *FINDINGS[number], verdict, cells, details, numbers)


def _absent(number: int, wanted: list[str]) -> Finding:
    return _finding(number, ABSENT, [], [f"needs {', '.join(wanted)}: not in this run"], {})


def findings(rows: list[Row], cells: list[dict[str, Any]], task: str) -> list[Finding]:
    """Findings 1–6 on one task of a run."""
    view = RunView(rows, cells, task)
    return [finding_dpo_vs_ppo(view), finding_overoptimisation(view), finding_pessimistic(view),
            finding_daa(view), finding_online_offline(view), finding_ranking(view, rows, task)]


def markdown(per_task: dict[str, list[Finding]], title: str) -> str:
    out = [f"# {title}: paper findings", ""]
    for task, fs in per_task.items():
        out += [f"## Task `{task}`", "", "| # | finding | paper's claim | cells | numbers | verdict |",
                "|---|---|---|---|---|---|"]
        out += [f"| {f.number} | {f.title} | {f.claim} | {', '.join(f.cells) or '–'} | "
                f"{'<br>'.join(f.details)} | **{f.verdict}** |" for f in fs]
        out.append("")
    out += ["Rules (a drop is peak − last gold per seed; intervals: 95% Student-t over seeds; "
            "`bench/findings.py`):", ""]
    out += [f"{n}. {title}: {rule}" for n, (title, _, rule) in FINDINGS.items()]
    return "\n".join(out) + "\n"


def as_json(per_task: dict[str, list[Finding]]) -> dict[str, Any]:
    return {task: [_clean(asdict(f)) for f in fs] for task, fs in per_task.items()}


def _clean(x: Any) -> Any:
    """NaN → None, all the way down (strict JSON)."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x
