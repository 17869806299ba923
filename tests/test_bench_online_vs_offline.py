"""benchmarks/online_vs_offline.py: the matched-KL analysis by hand (``_matched_kl.py``), each
method's own β sweep, the resumable rows, and one tiny end-to-end run of the script."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def mkl(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("_matched_kl")


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("online_vs_offline")


def rows_of(frontiers: dict[int, dict[str, list[tuple[float, float, float]]]]) -> list[dict]:
    """{seed: {method: [(β, KL, gold), ...]}} as the script's rows."""
    return [{"method": m, "beta": b, "seed": s, "labels": 256, "kl": k, "gold": g,
             "win_rate_gold": 0.5 + g / 10}
            for s, per in frontiers.items() for m, pts in per.items() for b, k, g in pts]


def test_a_frontier_interpolates_linearly_and_never_extrapolates(mkl):
    pts = [(3.0, 0.3), (1.0, 0.1)]
    assert mkl.frontier_at(pts, 2.5) == pytest.approx(0.25)
    assert mkl.frontier_at(pts, 1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="outside the frontier"):
        mkl.frontier_at(pts, 3.5)
    assert mkl.overlap([(1, 0), (3, 0)], [(2, 0), (4, 0)]) == (2, 3)
    assert mkl.overlap([(1, 0), (2, 0)], [(3, 0), (4, 0)]) is None


def test_matched_kl_by_hand_on_two_seeds(mkl):
    # seed 0: offline gold = 0.1·KL, online = 0.1·KL + 0.3 on [2, 3] -> online ahead by 0.3;
    # seed 1: offline = 0.1·(KL − 1), online = 0.1·(KL − 1) -> a gap of 0
    rows = rows_of({
        0: {"offline": [(1.0, 1.0, 0.1), (0.1, 3.0, 0.3)], "online": [(0.1, 2.0, 0.5), (0.01, 4.0, 0.7)]},
        1: {"offline": [(1.0, 1.0, 0.0), (0.1, 3.0, 0.2)], "online": [(0.1, 2.0, 0.1), (0.01, 4.0, 0.3)]},
    })
    mk = mkl.matched_kl(rows)
    # the mean frontiers: offline (1, .05)-(3, .25), online (2, .3)-(4, .5): common KL [2, 3]
    assert mk["kls"] == pytest.approx([2.0, 2.25, 2.5, 2.75, 3.0])
    assert mk["offline"] == pytest.approx([0.15, 0.175, 0.2, 0.225, 0.25])
    assert mk["diff"] == pytest.approx([0.15] * 5)
    assert mk["seed_gaps"] == pytest.approx({0: 0.3, 1: 0.0})
    # per seed at each KL: diffs [0.3, 0]: mean 0.15, half-width t(1) · s / √2 = 12.706 · 0.15
    for mean, half, n in mk["per_seed"]:
        assert (mean, half, n) == pytest.approx((0.15, 12.706 * 0.15, 2))
    assert mk["gap"] == pytest.approx((0.15, 12.706 * 0.15, 2))
    assert "contains 0" in mkl.verdict(mk)
    line = mkl.summary_line(mk, 60)
    assert "online_minus_offline_gold_at_matched_kl=0.1500 " in line
    assert "kl_overlap_low=2.000 kl_overlap_high=3.000 " in line
    assert "per_seed_gap_mean=0.1500 per_seed_gap_ci95=1.9059 per_seed_gap_seeds=2 seeds=2" in line
    table = "\n".join(mkl.method_table(rows))
    assert "| offline | 0.1 | 256 | 0.250 ± 0.635 | 3.00 ± 0.00 | 0.525 ± 0.064 |" in table
    assert "| 2.50 | 0.200 | 0.350 | +0.150 | 0.150 ± 1.906 (2) |" in mkl.matched_table(mk)


@pytest.mark.parametrize("ahead", ["online", "offline"])
def test_the_verdict_names_the_method_ahead(mkl, ahead):
    # three seeds, each with one method 0.2 ahead across the common KL range [2, 3]
    lead, lag = (0.2, 0.0) if ahead == "online" else (0.0, 0.2)
    rows = rows_of({s: {"offline": [(1.0, 1.0, lag + s / 10), (0.1, 3.0, lag + s / 10)],
                        "online": [(0.1, 2.0, lead + s / 10), (0.01, 4.0, lead + s / 10)]}
                    for s in range(3)})
    mk = mkl.matched_kl(rows)
    sign = 1 if ahead == "online" else -1
    assert mk["gap"][0] == pytest.approx(sign * 0.2)
    assert mk["gap"][1] == pytest.approx(0.0, abs=1e-9)
    assert mkl.verdict(mk).endswith(f"{ahead} ahead")


def test_disjoint_frontiers_give_no_matched_kl(mkl):
    rows = rows_of({0: {"offline": [(0.1, 8.0, 0.2), (0.3, 12.0, 0.3)],
                        "online": [(0.1, 3.0, 0.1), (0.3, 5.0, 0.2)]}})
    mk = mkl.matched_kl(rows)
    assert mk["kls"] == [] and mk["seed_gaps"] == {}
    assert mkl.matched_table(mk)[0].startswith("the two mean frontiers cover no common KL range")
    assert "online_minus_offline_gold_at_matched_kl=nan" in mkl.summary_line(mk, 1)
    assert mkl.verdict(mk).startswith("no seed's two frontiers overlap")


def test_each_method_gets_its_own_beta_sweep_and_betas_still_sets_both(script):
    assert script.beta_sweeps(script.parse([])) == {
        m: [float(b) for b in script.DEFAULT_BETAS[m].split(",")] for m in script.METHODS}
    assert script.beta_sweeps(script.parse(["--betas", "0.1,0.3"])) == {
        "offline": [0.1, 0.3], "online": [0.1, 0.3]}
    assert script.beta_sweeps(script.parse(["--betas", "0.1", "--online-betas", "0.01,0.02"])) == {
        "offline": [0.1], "online": [0.01, 0.02]}


def test_resume_reuses_only_rows_run_with_the_same_settings(script, tmp_path):
    args = script.parse(["--labels", "32"])
    same, other = script.settings(args), script.settings(script.parse(["--labels", "64"]))
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"method": "online", "beta": 0.1, "seed": 0, "settings": same})
                    + "\n" + json.dumps({"method": "offline", "beta": 0.1, "seed": 0,
                                         "settings": other}) + "\n")
    assert script.previous_rows(path, same) == {
        ("online", 0.1, 0): {"method": "online", "beta": 0.1, "seed": 0}}


def test_a_tiny_run_writes_rows_tables_plot_and_the_summary_line(script, tmp_path, world_cache,
                                                                 tiny_world, capsys):
    out = tmp_path / "out"
    argv = ["--labels", "16", "--seeds", "0", "--offline-betas", "1", "--online-betas", "0.3",
            "--eval-prompts", "4", "--eval-samples", "2", "--cache-dir", world_cache,
            "--out", str(out), "--plot", str(tmp_path / "docs" / "p.png")]
    script.main(argv)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["method"], r["beta"]) for r in rows] == [("offline", 1.0), ("online", 0.3)]
    for r in rows:  # equal labels: both methods used the whole budget
        assert r["labels"] == 16 and math.isfinite(r["kl"]) and math.isfinite(r["gold"])
        assert 0 < r["win_rate_gold"] < 1 and r["kl_stderr"] > 0 and r["gold_stderr"] > 0
    assert (tmp_path / "docs" / "p.png").stat().st_size > 0
    assert (out / "online_vs_offline.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "| online | 0.3 | 16 |" in text
    last = text.strip().splitlines()[-1]
    keys = dict(kv.split("=") for kv in last.split())
    assert {"online_minus_offline_gold_at_matched_kl", "kl_overlap_low", "kl_overlap_high",
            "per_seed_gap_mean", "per_seed_gap_ci95", "per_seed_gap_seeds", "seeds",
            "seconds"} <= set(keys)
    # a resumed run with the same settings trains nothing and reports the same rows
    script.main([*argv, "--resume"])
    assert capsys.readouterr().out.strip().splitlines()[-1].split()[:-1] == last.split()[:-1]
