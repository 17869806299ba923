"""bench/findings.py: each finding's numbers and every verdict branch on hand-made cells
(means, per-seed differences and Spearman ρ worked out in the comments)."""

from __future__ import annotations

import json
import math

import pytest

from alignlab.bench import findings as F
from alignlab.bench.results import aggregate

SEEDS = (0, 1, 2)
SHIFT = (-0.01, 0.0, 0.01)  # a seed's gold shift shared by all its cells: paired differences exact


def curve(name: str, pts: dict[str, tuple], noise: dict[str, tuple] | None = None) -> list[dict]:
    """Cells of ``name``: ``{setting: (kl, gold[, proxy])}``, three seeds, each seed's gold
    shifted by ``SHIFT`` plus ``noise[setting][seed]``."""
    out = []
    for setting, (kl, gold, *proxy) in pts.items():
        for s in SEEDS:
            g = gold + SHIFT[s] + (noise or {}).get(setting, (0, 0, 0))[s]
            out.append({"cell": {"task": "positive", "name": name, "algorithm": name, "sweep": {},
                                 "seed": s}, "setting": setting,
                        "metrics": {"gold_mean": g, "kl_to_ref": kl,
                                    **({"proxy_mean": proxy[0]} if proxy else {})}})
    return out


REF = curve("reference", {"default": (0.0, 0.2, 0.1)})
# best-of-n rises to 0.5 at n=8, falls to 0.35 at n=32 while the proxy keeps rising; the last
# point's noise makes the per-seed drops 0.14, 0.16, 0.15: mean 0.15, ± 4.303 · 0.01 / √3
RISE_FALL = {"n=2": (0.3, 0.4, 0.3), "n=8": (1.2, 0.5, 0.6), "n=32": (2.5, 0.35, 0.9)}
FALL_NOISE = {"n=32": (0.01, -0.01, 0.0)}
MONOTONE = {"n=2": (0.3, 0.3, 0.3), "n=8": (1.2, 0.4, 0.6), "n=32": (2.5, 0.5, 0.9)}


def run(*cell_lists: list[dict]) -> list[F.Finding]:
    cells = [c for cs in cell_lists for c in cs]
    return F.findings(aggregate(cells), cells, "positive")


def test_helpers_interpolate_only_inside_and_read_intervals():
    assert F.frontier_at([(3.0, 0.3), (1.0, 0.1)], 2.5) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no extrapolation"):
        F.frontier_at([(1.0, 0.1), (3.0, 0.3)], 3.5)
    assert F.overlap([(1, 0), (3, 0)], [(2, 0), (4, 0)]) == (2, 3)
    assert F.overlap([(1, 0), (2, 0)], [(3, 0), (4, 0)]) is None
    assert math.isnan(F.mean_gap([(1, 0), (2, 0)], [(3, 0), (4, 0)]))
    # as in a paper-findings run: lo + (hi - lo) rounds one ulp past hi, the overlap's end
    lo, hi = 0.8073415429726827, 3.0546690399448075
    assert lo + (hi - lo) > hi
    a = [(lo, 0.87757109375), (hi, 0.925569140625)]
    b = [(0.5, 0.8), (lo, 0.85), (hi, 0.9), (4.0, 0.91)]
    assert F.mean_gap(a, b) == pytest.approx(0.0266, abs=1e-3)
    iv = F.Interval
    assert [F.sign(iv(0.2, 0.1, 3)), F.sign(iv(-0.2, 0.1, 3)), F.sign(iv(0.2, 0.3, 3)),
            F.sign(iv(0.2, math.nan, 1))] == [1, -1, 0, 0]
    assert F.combine(["reproduced"] * 2) == "reproduced"
    assert F.combine(["reproduced", "not reproduced"]) == F.combine([]) == "inconclusive"


# ---- 1. DPO vs PPO ----------------------------------------------------------------------------

DPO = {"beta=1": (1.0, 0.3), "beta=0.3": (2.0, 0.5), "beta=0.1": (3.0, 0.6)}
PPO = {"kl=0.2": (1.5, 0.2), "kl=0.05": (2.5, 0.3), "kl=0.01": (4.0, 0.4)}


def test_dpo_dominating_ppo_is_reproduced_with_the_matched_kl_numbers():
    f1 = run(curve("dpo", DPO), curve("ppo_gold", PPO))[0]
    # common KL [1.5, 3] at 1.5, 1.875, 2.25, 2.625, 3: DPO .4, .475, .525, .5625, .6; PPO .2,
    # .2375, .275, .30833, .33333: gaps .2, .2375, .25, .25417, .26667, mean .241667; every seed
    # shifted alike → the same gap per seed, half-width 0
    assert f1.verdict == "reproduced" and f1.cells == ["dpo", "ppo_gold"]
    n = f1.numbers["ppo_gold"]
    assert n["overlap"] == [1.5, 3.0] and n["mean_frontier_gap"] == pytest.approx(0.241667, abs=1e-6)
    assert n["per_seed_gap"]["mean"] == pytest.approx(0.241667, abs=1e-6) and n["per_seed_gap"]["n"] == 3
    assert n["per_seed_gap"]["ci95"] == pytest.approx(0.0, abs=1e-9)
    assert n["other_best_at_no_more_kl"] == pytest.approx(0.3)  # PPO's best at KL ≤ 3
    assert "DPO's best gold 0.600 (KL 3.00) ≥ ppo_gold's best at no more KL 0.300" in f1.details[0]


def test_ppo_ahead_is_not_reproduced_and_a_split_is_inconclusive():
    behind = {k: (kl, g - 0.5) for k, (kl, g) in DPO.items()}
    assert run(curve("dpo", behind), curve("ppo_gold", PPO))[0].verdict == "not reproduced"
    split = run(curve("dpo", DPO), curve("ppo_gold", PPO),
                curve("ppo", {k: (kl, g + 0.5) for k, (kl, g) in PPO.items()}))[0]
    assert split.verdict == "inconclusive" and split.cells == ["dpo", "ppo_gold", "ppo"]
    assert [d.rsplit("→ ", 1)[-1].split(";")[0] for d in split.details] == ["reproduced", "not reproduced"]


def test_no_common_kl_or_a_noisy_gap_is_inconclusive():
    far = {k: (kl + 10, g) for k, (kl, g) in PPO.items()}
    f1 = run(curve("dpo", DPO), curve("ppo_gold", far))[0]
    assert f1.verdict == "inconclusive" and "no common KL range" in f1.details[0]
    assert f1.numbers["ppo_gold"]["overlap"] is None
    # the same frontier, seeds scattered ±0.3: the per-seed gap's interval contains 0
    noisy = curve("ppo_gold", DPO, {k: (0.3, -0.3, 0.0) for k in DPO})
    assert run(curve("dpo", DPO), noisy)[0].verdict == "inconclusive"


# ---- 2. over-optimisation ---------------------------------------------------------------------

def test_rise_then_fall_with_a_rising_proxy_is_reproduced():
    f2 = run(REF, curve("best_of_n", RISE_FALL, FALL_NOISE))[1]
    assert f2.verdict == "reproduced" and f2.cells == ["reference", "best_of_n"]
    n = f2.numbers["best_of_n"]
    assert n["peak"]["setting"] == "n=8" and n["peak"]["kl"] == 1.2 and n["peak_at"] == "interior"
    assert n["last"]["gold"] == pytest.approx(0.35) and n["proxy_rise"] == pytest.approx(0.3)
    assert n["drop"]["mean"] == pytest.approx(0.15)
    assert n["drop"]["ci95"] == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert "peak gold 0.500 at KL 1.20 (n=8, interior)" in f2.details[0]


@pytest.mark.parametrize(("pts", "noise", "verdict", "why"), [
    (MONOTONE, None, "not reproduced", "last"),  # gold highest at the largest KL: no fall
    ({**RISE_FALL, "n=32": (2.5, 0.35, 0.5)}, FALL_NOISE, "not reproduced", "proxy"),  # proxy fell
    ({"n=2": (0.3, 0.15, 0.3), "n=8": (1.2, 0.1, 0.6)}, None, "not reproduced", "first"),
    (RISE_FALL, {"n=32": (0.3, -0.2, 0.05)}, "inconclusive", "noise"),  # drops −.15, .35, .1
    ({"n=2": (0.3, 0.4, 0.3)}, None, "inconclusive", "two points"),
])
def test_each_overoptimisation_branch(pts, noise, verdict, why):
    f2 = run(REF, curve("best_of_n", pts, noise))[1]
    assert f2.verdict == verdict, why


def test_curves_that_disagree_make_the_finding_inconclusive():
    f2 = run(REF, curve("best_of_n", RISE_FALL, FALL_NOISE), curve("grpo_proxy", MONOTONE))[1]
    assert f2.verdict == "inconclusive"
    assert [f2.numbers[n]["verdict"] for n in ("best_of_n", "grpo_proxy")] == ["reproduced", "not reproduced"]


# ---- 3. pessimistic ensembles -----------------------------------------------------------------

def test_an_ensemble_that_reduces_the_fall_is_reproduced():
    # min: peak .48 at n=8, .47 at n=32: drop .01 a seed; mean: drops .14, .16, .15 → the
    # reduction per seed .13, .15, .14: mean .14 ± 4.303 · .01 / √3
    pess = {"n=2": (0.3, 0.38, 0.2), "n=8": (1.2, 0.48, 0.4), "n=32": (2.5, 0.47, 0.6)}
    f3 = run(REF, curve("best_of_n", RISE_FALL, FALL_NOISE), curve("best_of_n_min", pess))[2]
    assert f3.verdict == "reproduced" and f3.cells == ["reference", "best_of_n_min", "best_of_n"]
    n = f3.numbers["best_of_n_min vs best_of_n"]
    assert n["reduction"]["mean"] == pytest.approx(0.14)
    assert n["reduction"]["ci95"] == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert n["largest_common_kl"] == 2.5
    assert n["gold_at_largest_common_kl"] == pytest.approx({"best_of_n_min": 0.47, "best_of_n": 0.35})
    assert n["best_of_n_min"]["drop"]["mean"] == pytest.approx(0.01)


def test_an_ensemble_that_falls_further_or_nothing_to_reduce():
    worse = {"n=2": (0.3, 0.4, 0.3), "n=8": (1.2, 0.5, 0.6), "n=32": (2.5, 0.2, 0.9)}
    f3 = run(REF, curve("best_of_n", RISE_FALL, FALL_NOISE), curve("best_of_n_mean_minus_std", worse))[2]
    assert f3.verdict == "not reproduced"  # reduction .15 − .30 per seed (±.01)
    assert f3.numbers["best_of_n_mean_minus_std vs best_of_n"]["reduction"]["mean"] == pytest.approx(-0.15)
    f3 = run(REF, curve("grpo_proxy", MONOTONE), curve("grpo_mean_minus_std", RISE_FALL))[2]
    assert f3.verdict == "inconclusive"  # the mean aggregate does not fall: nothing to reduce
    noisy = curve("best_of_n_min", RISE_FALL, {"n=32": (0.3, -0.2, 0.05)})
    assert run(REF, curve("best_of_n", RISE_FALL, FALL_NOISE), noisy)[2].verdict == "inconclusive"


# ---- 4. DAAs ------------------------------------------------------------------------------------

def test_daas_falling_at_high_kl():
    falls = {"beta=1": (1.0, 0.4), "beta=0.1": (3.0, 0.5), "beta=0.01": (6.0, 0.3)}
    f4 = run(REF, curve("dpo", falls, {"beta=0.01": (0.01, -0.01, 0.0)}))[3]
    assert f4.verdict == "reproduced" and f4.cells == ["reference", "dpo"]
    assert f4.numbers["dpo"]["drop"]["mean"] == pytest.approx(0.2)
    rising = {"beta=1": (1.0, 0.3), "beta=0.1": (3.0, 0.5)}
    f4 = run(REF, curve("dpo", falls), curve("ipo", rising),
             curve("slic", falls, {"beta=0.01": (0.3, -0.3, 0.0)}))[3]
    assert [f4.numbers[n]["verdict"] for n in ("dpo", "ipo", "slic")] == [
        "reproduced", "not reproduced", "inconclusive"]
    assert f4.verdict == "inconclusive"
    assert run(REF, curve("ipo", rising))[3].verdict == "not reproduced"


# ---- 5. online vs offline ---------------------------------------------------------------------

@pytest.mark.parametrize(("shift", "verdict"), [(0.2, "reproduced"), (-0.2, "not reproduced"),
                                                (None, "inconclusive")])
def test_online_against_offline_at_matched_kl(shift, verdict):
    online = ({k: (kl, g + shift) for k, (kl, g) in DPO.items()} if shift is not None
              else {k: (kl + 10, g) for k, (kl, g) in DPO.items()})
    f5 = run(curve("dpo", DPO), curve("online_dpo", online))[4]
    assert f5.verdict == verdict and f5.cells == ["online_dpo", "dpo"]
    if shift is not None:
        assert f5.numbers["per_seed_gap"]["mean"] == pytest.approx(shift)
    else:
        assert "no common KL range" in f5.details[0]


# ---- 6. ranking agreement ---------------------------------------------------------------------

def ranked(annotator_order: list[int]) -> list[dict]:
    """Rows whose gold win rates are ranked 1..n and the annotator's as given."""
    cells = []
    for i, a in enumerate(annotator_order):
        for c in curve(f"m{i}", {"default": (0.0, 0.1)}):
            c["metrics"].update(win_rate_gold=0.1 * (i + 1), win_rate_annotator=0.1 * a)
            cells.append(c)
    return cells


@pytest.mark.parametrize(("order", "rho", "verdict"), [
    ([1, 2, 3, 4, 5], 1.0, "reproduced"),
    ([2, 1, 3, 4, 5], 0.9, "reproduced"),  # Σd² = 2: ρ = 1 − 6·2/(5·24)
    ([2, 3, 1, 4, 5], 0.7, "not reproduced"),  # Σd² = 1 + 1 + 4 = 6
    ([5, 4, 3, 2, 1], -1.0, "not reproduced"),
    ([1, 2, 3, 4], 1.0, "inconclusive"),  # fewer than 5 rows
])
def test_spearman_from_hand_made_ranks(order, rho, verdict):
    f6 = run(ranked(order))[5]
    assert f6.numbers == {"spearman": pytest.approx(rho), "rows": len(order)}
    assert f6.verdict == verdict and f6.cells == [f"m{i}" for i in range(len(order))]


# ---- a run without the findings' algorithms, and the outputs -----------------------------------

def test_missing_algorithms_say_not_in_this_run_and_the_outputs_carry_everything():
    fs = run(curve("sft", {"default": (0.5, 0.3)}))
    assert [f.number for f in fs] == [1, 2, 3, 4, 5, 6]
    assert all(f.verdict == "not in this run" for f in fs) and fs[0].cells == []
    assert fs[0].details == ["needs dpo, ppo_gold, ppo: not in this run"]
    per_task = {"positive": run(REF, curve("best_of_n", RISE_FALL, FALL_NOISE))}
    md = F.markdown(per_task, "alignlab bench: x")
    assert "| 2 | Over-optimisation of a proxy | Optimising a learned proxy" in md
    assert "| **reproduced** |" in md and "| **not in this run** |" in md
    assert all(f"{n}. {F.FINDINGS[n][0]}: {F.FINDINGS[n][2]}" in md for n in F.FINDINGS)
    data = json.loads(json.dumps(F.as_json(per_task), allow_nan=False))  # strict JSON: no NaN
    f2 = data["positive"][1]
    assert f2["verdict"] == "reproduced" and f2["rule"] == F.FINDINGS[2][2]
    assert f2["numbers"]["best_of_n"]["peak"] == {"cell": "best_of_n", "setting": "n=8", "kl": 1.2,
                                                  "gold": pytest.approx(0.5), "proxy": 0.6}
