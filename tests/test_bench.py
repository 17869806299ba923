"""``alignlab bench``: the suite's typed config, the plan of cells, a two-cell suite run →
interrupted → resumed → reported, the report's numbers on fabricated cells, the HTML report in a
real headless Chromium, and (slow) the shipped quick suite."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from alignlab.bench.config import load_suite, shipped_suites
from alignlab.bench.plan import plan, sweep_label
from alignlab.bench.report import write_report
from alignlab.bench.results import aggregate, load_cells
from alignlab.bench.runner import run_suite
from alignlab.core.config import set_dotted
from alignlab.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _suite_file(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


MINIMAL = {"name": "t", "tasks": ["positive"], "algorithms": [{"name": "dpo", "algorithm": "dpo"}]}


# ---- the suite config ------------------------------------------------------------------------

def test_unknown_suite_keys_are_rejected_naming_the_field(tmp_path):
    bad = {**MINIMAL, "algorithms": [{"name": "dpo", "algorithm": "dpo", "sweeep": {}}]}
    with pytest.raises(ConfigError) as err:
        load_suite(_suite_file(tmp_path, bad))
    assert "field 'algorithms.0.sweeep': unknown field; allowed fields: name, algorithm" in str(err.value)
    with pytest.raises(ConfigError, match="field 'budget.step': unknown field; allowed fields: steps, labels"):
        load_suite(_suite_file(tmp_path, {**MINIMAL, "budget": {"step": 3}}))
    with pytest.raises(ConfigError, match=r"field 'algorithms.0.algorithm'.*unknown algorithm 'dpoo'"):
        load_suite(_suite_file(tmp_path, {**MINIMAL, "algorithms": [{"name": "x", "algorithm": "dpoo"}]}))
    with pytest.raises(ConfigError, match="a reward model is not a policy to evaluate"):
        load_suite(_suite_file(tmp_path, {**MINIMAL, "algorithms": [{"name": "rm", "algorithm": "reward"}]}))
    with pytest.raises(ConfigError, match="field 'tasks.*unknown task 'negative'"):
        load_suite(_suite_file(tmp_path, {**MINIMAL, "tasks": ["negative"]}))
    twice = {**MINIMAL, "algorithms": [{"name": "a", "algorithm": "dpo"}, {"name": "a", "algorithm": "ipo"}]}
    with pytest.raises(ConfigError, match="repeated: a"):
        load_suite(_suite_file(tmp_path, twice))
    bon = {**MINIMAL, "algorithms": [{"name": "bon", "algorithm": "best_of_n", "sweep": {"n": [2]}}]}
    with pytest.raises(ConfigError, match="best-of-n by the proxy reward needs prepare.reward_model"):
        load_suite(_suite_file(tmp_path, bon))
    with pytest.raises(ConfigError, match=r"pass_at_k \[8\]"):
        load_suite(_suite_file(tmp_path, {**MINIMAL, "eval": {"pass_at_k": [8], "samples_per_prompt": 4}}))
    with pytest.raises(ConfigError, match="no shipped suite of that name; shipped suites: .*quick"):
        load_suite("nonexistent-suite")


def test_set_merges_sections_and_sweep_labels():
    data = {"train": {"lr": 1.0, "max_steps": 5}, "rl": {"reward": "gold"}}
    set_dotted(data, "train", {"lr": 2.0}, merge=True)
    set_dotted(data, "rl.reward", {"gold": 1.0, "brevity": 0.5}, merge=True)  # replaces a value
    assert data == {"train": {"lr": 2.0, "max_steps": 5}, "rl": {"reward": {"gold": 1.0, "brevity": 0.5}}}
    set_dotted(data, "train", {"lr": 3.0})  # without merge a mapping replaces the section
    assert data["train"] == {"lr": 3.0}
    assert sweep_label({}) == "default"
    assert sweep_label({"preference.beta": 0.1, "train.lr": 1e-4}) == "beta=0.1,lr=0.0001"
    assert sweep_label({"a.beta": 1, "b.beta": 2}) == "a.beta=1,b.beta=2"


def test_the_quick_suite_plans_every_family_at_fixed_budgets(tmp_path):
    assert "quick" in shipped_suites()
    suite = load_suite("quick")
    jobs = plan(suite, tmp_path)
    cells = [j for j in jobs if j.kind == "cell"]
    names = {j.spec["name"] for j in cells}
    assert names == {"reference", "dpo", "ppo", "grpo", "online_dpo", "best_of_n"}
    # tasks × points × seeds: reference 2×2, dpo 2 β × 2, ppo 2, grpo 2 tasks × 2,
    # online_dpo 2, best-of-n 2 n × 2 tasks × 2 = 24 cells, + 3 prepare stages per task
    assert len(cells) == 24 and len(jobs) == 30
    trained = [j for j in cells if j.spec["train"] is not None]
    assert {j.spec["train"]["config"]["train"]["max_steps"] for j in trained} == {6}
    for j in trained:
        cfg = j.spec["train"]["config"]
        assert cfg["train"]["seed"] == j.spec["seed"]
        assert cfg["model"]["name_or_path"].endswith(f"prepare/{j.spec['task']}/sft/train/final")
        assert cfg["train"]["output_dir"] == str(tmp_path.resolve() / j.id / "train")
        if "rollout" in cfg:
            assert cfg["rollout"]["prompts"] == f"world:{j.spec['task']}"
    dpo = next(j for j in cells if j.spec["name"] == "dpo")
    assert dpo.spec["train"]["config"]["data"]["source"].endswith("prepare/positive/preferences/preferences.jsonl")
    assert dpo.spec["budget"] == {"steps": 6, "labels": 128}
    grpo = next(j for j in cells if j.spec["name"] == "grpo")
    assert grpo.spec["train"]["config"]["rl"]["reward_params"]["reward_model"]["path"].endswith(
        "prepare/positive/reward_model/train/final")
    assert grpo.spec["budget"] == {"steps": 6, "samples": 6 * 4 * 4}
    online = next(j for j in cells if j.spec["name"] == "online_dpo")
    assert online.spec["train"]["config"]["online_dpo"]["judge"]["max_labels"] == 128  # the budget
    assert online.spec["budget"] == {"steps": 6, "samples": 6 * 4 * 4, "labels": 128}
    bon = [j for j in cells if j.spec["name"] == "best_of_n"]
    assert sorted({j.spec["best_of_n"]["n"] for j in bon}) == [2, 8]
    arith = next(j for j in cells if j.spec["task"] == "arithmetic")
    assert arith.spec["eval"]["pass_at_k"] == [1, 4]
    assert all(j.spec["eval"]["pass_at_k"] == [] for j in cells if j.spec["task"] == "positive")


def test_the_paper_findings_suite_validates_every_cell(tmp_path):
    jobs = plan(load_suite("paper-findings"), tmp_path)
    # per task 3 prepare stages; 3 seeds × (reference + 7 cells) on positive, × (1 + 22) on
    # positive_short: the trim that fits the hour on 2 cores
    assert len(jobs) == 96 and len(load_suite("paper-findings").seeds) == 3
    names = {t: {j.spec["name"] for j in jobs if j.kind == "cell" and j.spec["task"] == t}
             for t in ("positive", "positive_short")}
    assert names["positive"] == {"reference", "dpo", "online_dpo", "ppo_gold"}
    assert names["positive_short"] == {"reference", "ipo", "slic", "grpo_proxy", "grpo_mean_minus_std",
                                       "best_of_n", "best_of_n_mean_minus_std", "best_of_n_min"}
    mms = next(j for j in jobs if j.spec.get("name") == "best_of_n_mean_minus_std")
    assert mms.spec["best_of_n"] == {"n": 2, "reward": "proxy", "aggregate": "mean_minus_std",
                                     "std_coef": 1.0}
    assert sorted({j.spec["best_of_n"]["n"] for j in jobs if j.spec.get("name") == "best_of_n"}) == [2, 4, 16]
    # a swept preference.beta on the ipo alias keeps its loss (it once reset it to DPO's)
    ipo = [j for j in jobs if j.spec.get("name") == "ipo"]
    assert {j.spec["train"]["config"]["preference"]["loss"] for j in ipo} == {"ipo"}
    assert {j.spec["train"]["config"]["preference"]["beta"] for j in ipo} == {0.01, 0.1, 1.0}
    assert {j.spec["train"]["config"]["train"]["lr"] for j in ipo} == {1e-3}  # to reach gold's fall
    ppo = [j for j in jobs if j.spec.get("name") == "ppo_gold"]
    assert {j.spec["train"]["config"]["rl"]["epochs"] for j in ppo} == {1}
    # one annotator, with a taste for length, labels the pairs and judges online DPO
    prefs = [j for j in jobs if j.kind == "preferences"]
    assert [j.spec["annotator"]["length_bias"] for j in prefs] == [0.03, 0.03]
    online = next(j for j in jobs if j.spec.get("name") == "online_dpo")
    assert online.spec["train"]["config"]["online_dpo"]["judge"]["length_bias"] == 0.03


def test_unknown_placeholders_and_bad_cell_configs_name_the_cell(tmp_path):
    bad = {**MINIMAL, "algorithms": [{"name": "dpo", "algorithm": "dpo", "set": {"data.source": "{prefs}"}}]}
    with pytest.raises(ConfigError, match=r"algorithms 'dpo' \(positive, default, seed 0\): placeholder \{prefs\}"):
        plan(load_suite(_suite_file(tmp_path, bad)), tmp_path)
    bad = {**MINIMAL, "algorithms": [{"name": "dpo", "algorithm": "dpo", "set": {"preference.bta": 1}}]}
    with pytest.raises(ConfigError, match="field 'preference.bta': unknown field"):
        plan(load_suite(_suite_file(tmp_path, bad)), tmp_path)


# ---- run → interrupt → resume → report --------------------------------------------------------

def _two_cells(world_cache: str) -> dict:
    """The reference (the base model) and DPO from it on oracle pairs, 3 steps, a checkpoint
    every step; the DPO cell starts from the repository's example config."""
    return {"name": "two", "world": {"preset": "tiny", "cache_dir": world_cache},
            "tasks": ["positive"], "seeds": [0], "budget": {"steps": 3, "labels": 48},
            "eval": {"n_prompts": 4, "samples_per_prompt": 2},
            "algorithms": [{"name": "dpo", "algorithm": "dpo",
                            "config": str(ROOT / "examples" / "dpo_world.yaml"),
                            "set": {"train": {"batch_size": 8, "lr": 1e-4, "save_every": 1, "log_every": 1},
                                    "preference.heldout": 8}}]}


def test_a_two_cell_suite_runs_resumes_and_reports(tmp_path, world_cache, tiny_world):
    suite = load_suite(_suite_file(tmp_path, _two_cells(world_cache)))
    run_dir = tmp_path / "run"
    first = run_suite(suite, run_dir, jobs=2, progress=False)
    assert first.ok and sorted(first.done) == ["cells/positive/dpo/default/seed_0",
                                              "cells/positive/reference/default/seed_0"]
    dpo = run_dir / "cells/positive/dpo/default/seed_0"
    assert (dpo / "config.yaml").exists() and (dpo / "train/DONE").exists()
    m = json.loads((dpo / "eval.json").read_text())["metrics"]
    for key in ("gold_mean", "kl_to_ref", "win_rate_gold", "win_rate_annotator", "self_bleu", "ppl_base"):
        assert math.isfinite(m[key]), key
    ref = json.loads((run_dir / "cells/positive/reference/default/seed_0/eval.json").read_text())
    assert ref["metrics"]["kl_to_ref"] == 0.0 and ref["kl_estimator"] == "mc_k1"

    # Interrupt the DPO cell after its step-2 checkpoint: the step-3 checkpoint, the final model
    # and everything after it are gone, as if the process had been killed there.
    ckpts = dpo / "train/checkpoints"
    shutil.rmtree(ckpts / "step-0000003")
    (ckpts / "latest").write_text("step-0000002\n")
    for name in ("train/final", "train/DONE", "eval.json", "DONE"):
        p = dpo / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    second = run_suite(suite, run_dir, jobs=2, progress=False)
    assert second.skipped == ["cells/positive/reference/default/seed_0"]  # finished: not redone
    assert second.done == ["cells/positive/dpo/default/seed_0"]
    assert "resumed from step 2" in (dpo / "log.txt").read_text()
    steps = [json.loads(x)["step"] for x in (dpo / "train/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # no step logged twice

    third = run_suite(suite, run_dir, jobs=2, progress=False)
    assert len(third.skipped) == 2 and third.done == [] and third.ok

    changed = _two_cells(world_cache)
    changed["eval"]["n_prompts"] = 5
    with pytest.raises(ConfigError, match=r"finished cells of another configuration.*eval.n_prompts"):
        run_suite(load_suite(_suite_file(tmp_path, changed)), run_dir, progress=False)

    paths = write_report(run_dir)
    rows = list(csv_rows(paths["csv"]))
    assert [r["name"] for r in rows] and sorted(r["name"] for r in rows) == ["dpo", "reference"]
    assert "| dpo | default | 1 |" in paths["markdown"].read_text()
    assert paths["html"].read_text().count("<img ") == 2  # frontier, win rates (no proxy)


def csv_rows(path: Path):
    import csv

    with path.open() as f:
        yield from csv.DictReader(f)


# ---- the report on fabricated cells ----------------------------------------------------------

def _fake_cell(run_dir: Path, task: str, name: str, setting: str, seed: int, metrics: dict,
               algorithm: str | None = None) -> None:
    d = run_dir / "cells" / task / name / setting / f"seed_{seed}"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({
        "cell": {"task": task, "name": name, "algorithm": algorithm or name, "sweep": {}, "seed": seed},
        "kl_estimator": "mc_k1", "metrics": metrics}))
    (d / "DONE").write_text("done\n")


def fabricated_run(run_dir: Path) -> Path:
    """Two tasks; per task a reference, DPO at two β and best-of-n at two n, two seeds each."""
    for task, shift in (("positive", 0.0), ("arithmetic", 0.1)):
        for seed in (0, 1):
            _fake_cell(run_dir, task, "reference", "default", seed,
                       {"gold_mean": 0.2 + shift, "kl_to_ref": 0.0, "proxy_mean": 0.1,
                        "win_rate_gold": 0.5, "win_rate_annotator": 0.5, "pass_at_1": 0.3})
            for i, beta in enumerate((0.1, 0.5)):
                _fake_cell(run_dir, task, "dpo", f"beta={beta}", seed,
                           {"gold_mean": 0.4 + 0.1 * i + 0.02 * seed + shift, "kl_to_ref": 2.0 - i,
                            "proxy_mean": 0.8 - 0.2 * i, "win_rate_gold": 0.6 + 0.01 * seed,
                            "win_rate_annotator": 0.55, "pass_at_1": 0.4})
            for n in (2, 8):
                _fake_cell(run_dir, task, "best_of_n", f"n={n}", seed,
                           {"gold_mean": 0.3 + 0.01 * n, "kl_to_ref": math.log(n) - (n - 1) / n,
                            "proxy_mean": 0.2 + 0.05 * n, "win_rate_gold": 0.55,
                            "win_rate_annotator": 0.52 + 0.02 * seed, "pass_at_1": 0.35})
    (run_dir / "suite.yaml").write_text("name: fabricated\ndescription: made up numbers\n")
    return run_dir


def test_the_leaderboard_aggregates_seeds_with_t_intervals(tmp_path):
    run = fabricated_run(tmp_path / "run")
    rows = aggregate(load_cells(run))
    assert len(rows) == 10 and {r.task for r in rows} == {"positive", "arithmetic"}
    beta = next(r for r in rows if r.task == "positive" and r.setting == "beta=0.5")
    gold = beta.values["gold_mean"]  # seeds: 0.50 and 0.52 → mean 0.51, s = 0.01·√2
    assert gold.mean == pytest.approx(0.51) and gold.n == 2
    assert gold.half_width == pytest.approx(12.706 * 0.02 / math.sqrt(2) / math.sqrt(2))
    positive = [r for r in rows if r.task == "positive"]
    assert [r.name for r in positive][0] == "dpo" and positive[0].setting == "beta=0.5"  # best gold first
    paths = write_report(run)
    md = paths["markdown"].read_text()
    assert "| dpo | beta=0.5 | 2 | 0.510 ± 0.127 |" in md and "pass@1" in md
    # annotator and gold win rates order the five rows alike (ties included): ρ = 1
    assert "gold win rates over 5 rows = 1.000" in md
    assert json.loads(paths["json"].read_text())["ranking_agreement"]["positive"] == {"spearman": 1.0, "rows": 5}
    # the findings of the run's algorithms: best-of-n's gold still rises at its largest n (no
    # fall); DPO peaks at β 0.5 (KL 1) and falls by 0.1 in both seeds at β 0.1 (KL 2); ρ = 1
    verdicts = ["not in this run", "not reproduced", "not in this run", "reproduced",
                "not in this run", "reproduced"]
    found = json.loads(paths["findings_json"].read_text())["positive"]
    assert [f["verdict"] for f in found] == verdicts
    assert found[3]["numbers"]["dpo"]["drop"] == {"mean": pytest.approx(0.1), "ci95": pytest.approx(0.0), "n": 2}
    assert "| 4 | DAAs over-optimise |" in paths["findings_markdown"].read_text()
    header = paths["csv"].read_text().splitlines()[0]
    assert header.startswith("task,algorithm,name,setting,seeds,gold_mean_mean,gold_mean_ci95")
    for task in ("positive", "arithmetic"):
        for kind in ("frontier", "overoptimisation", "win_rates"):
            assert paths[f"{kind}_{task}"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the HTML report in a real browser --------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const out = document.createElement("pre");
  out.id = "bench-check";
  out.textContent = JSON.stringify({
    images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    tables: document.querySelectorAll("table.leaderboard").length,
    rows: document.querySelectorAll("table.leaderboard tbody tr").length,
    headers: [...document.querySelectorAll("table.leaderboard th")].map(th => th.textContent),
    findings: [...document.querySelectorAll("table.findings td[data-verdict]")].map(td => td.textContent)});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                    "(Debian: apt-get install chromium); the HTML report is not checked in a browser")
def test_the_html_report_renders_in_headless_chromium(tmp_path):
    paths = write_report(fabricated_run(tmp_path / "run"))
    page = paths["html"].read_text()
    assert "file:" not in page and "http" not in page  # self-contained: nothing to fetch
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK + "</body>"))
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
         probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    start = proc.stdout.index('<pre id="bench-check">') + len('<pre id="bench-check">')
    found = json.loads(proc.stdout[start:proc.stdout.index("</pre>", start)])
    # per task: frontier, over-optimisation (proxy present) and win rates
    assert found["images"] == 6 and found["decoded"] == 6
    assert found["tables"] == 2 and found["rows"] == 10
    assert {"gold", "KL(π‖ref)", "win (gold BT)", "win (annotator)", "pass@1"} <= set(found["headers"])
    assert found["findings"] == 2 * ["not in this run", "not reproduced", "not in this run", "reproduced",
                                     "not in this run", "reproduced"]


# ---- the CLI ---------------------------------------------------------------------------------

def test_the_cli_reports_a_run_and_names_a_bad_suite_field(tmp_path):
    from typer.testing import CliRunner

    from alignlab.cli.main import app

    run = fabricated_run(tmp_path / "run")
    res = CliRunner().invoke(app, ["bench", "report", str(run), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.html").exists() and "| dpo | beta=0.5 |" in res.output
    assert "| 6 | Annotator vs gold ranking |" in res.output and "and 6 plots" in res.output
    bad = _suite_file(tmp_path, {**MINIMAL, "seedz": [1]})
    res = CliRunner().invoke(app, ["bench", "run", str(bad)])
    assert res.exit_code != 0 and "field 'seedz': unknown field" in str(res.exception)


# ---- the shipped quick suite -----------------------------------------------------------------

@pytest.mark.slow
def test_the_quick_suite_runs_end_to_end(tmp_path, world_cache, tiny_world):
    suite = load_suite("quick", [f"world.cache_dir={world_cache}"])
    result = run_suite(suite, tmp_path / "quick", jobs=2, progress=False)
    assert result.ok, result.failed
    assert len(result.done) == 30
    paths = write_report(tmp_path / "quick")
    rows = list(csv_rows(paths["csv"]))
    assert {r["name"] for r in rows} == {"reference", "dpo", "ppo", "grpo", "online_dpo", "best_of_n"}
    arith = [r for r in rows if r["task"] == "arithmetic"]
    assert all(r["pass_at_4_mean"] != "" for r in arith)
