"""``alignlab bench report RUN_DIR``: the leaderboard (Markdown, CSV, JSON), PNG plots, the
paper-findings table (``findings.md``/``.json``, ``findings.py``) and one self-contained HTML page
(tables, and the plots embedded as base64 PNG).

Every number is a mean over the seeds of a (task, algorithm, sweep point) with its 95%
Student-t interval ``± t_{0.975, k−1}·s/√k`` (``eval/intervals.py``); a single seed has none.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path

from alignlab.bench import findings, plots
from alignlab.bench.results import Row, aggregate, columns, load_cells, ranking_agreement
from alignlab.core.errors import AlignlabError
from alignlab.core.io import atomic_write_json, atomic_write_text
from alignlab.eval.intervals import Interval

NOTES = [
    "Mean over seeds ± the half-width of the 95% Student-t interval (t_{0.975,k−1}·s/√k); "
    "one seed: no interval.",
    "KL(π‖ref): Monte-Carlo over the policy's own samples at temperature 1, "
    "mean of Σ_t log π(y_t|·) − log π_ref(y_t|·) per completion (eos included); best-of-n: "
    "the analytic log n − (n−1)/n.",
    "win (gold BT): mean σ(gold(y) − gold(y_ref)), policy and reference samples paired per "
    "prompt; win (annotator): the simulated annotator's preference share on the same pairs, "
    "ties ½.",
    "ppl (base): perplexity of the completions under the world's base model; self-BLEU: BLEU-4 "
    "of each completion against all others (Texygen); pass@k: the unbiased estimator of Chen "
    "et al. 2021.",
]


def fmt(iv: Interval | None) -> str:
    if iv is None or math.isnan(iv.mean):
        return "–"
    return f"{iv.mean:.3f}" if math.isnan(iv.half_width) else f"{iv.mean:.3f} ± {iv.half_width:.3f}"


def markdown(rows: list[Row], title: str) -> str:
    out = [f"# {title}", ""]
    for task in dict.fromkeys(r.task for r in rows):
        cols = columns([r for r in rows if r.task == task])
        out += [f"## Task `{task}`", "",
                "| algorithm | setting | seeds | " + " | ".join(t for _, t in cols) + " |",
                "|---|---|---|" + "---|" * len(cols)]
        for r in (r for r in rows if r.task == task):
            out.append(f"| {r.name} | {r.setting} | {len(r.seeds)} | "
                       + " | ".join(fmt(r.values.get(k)) for k, _ in cols) + " |")
        out += ["", agreement_line(rows, task), ""]
    out += ["Notes:", "", *(f"- {n}" for n in NOTES), ""]
    return "\n".join(out)


def agreement_line(rows: list[Row], task: str) -> str:
    rho, n = ranking_agreement(rows, task)
    value = "–" if math.isnan(rho) else f"{rho:.3f}"
    return (f"Ranking agreement (AlpacaFarm's check): Spearman ρ between the annotator's and the "
            f"gold win rates over {n} rows = {value}.")


def csv_text(rows: list[Row]) -> str:
    cols = columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "algorithm", "name", "setting", "seeds"]
               + [f"{k}_{part}" for k, _ in cols for part in ("mean", "ci95")])
    for r in rows:
        vals = []
        for k, _ in cols:
            iv = r.values.get(k)
            vals += ["" if iv is None or math.isnan(iv.mean) else f"{iv.mean:.6g}",
                     "" if iv is None or math.isnan(iv.half_width) else f"{iv.half_width:.6g}"]
        w.writerow([r.task, r.algorithm, r.name, r.setting, len(r.seeds)] + vals)
    return buf.getvalue()


def findings_html(per_task: dict[str, list[findings.Finding]]) -> list[str]:
    """The findings tables (one per task, class ``findings``) and their rules."""
    e = html.escape
    parts = ["<h2>Paper findings</h2>"]
    for task, fs in per_task.items():
        parts.append(f"<h3>Task <code>{e(task)}</code></h3><table class=\"findings\" "
                     f"data-task=\"{e(task)}\"><thead><tr><th>#</th><th>finding</th>"
                     "<th>paper's claim</th><th>cells</th><th>numbers</th><th>verdict</th></tr>"
                     "</thead><tbody>")
        parts += [f"<tr><td>{f.number}</td><td>{e(f.title)}</td><td class=\"text\">{e(f.claim)}</td>"
                  f"<td class=\"text\">{e(', '.join(f.cells) or '–')}</td><td class=\"text\">"
                  + "<br>".join(e(d) for d in f.details)
                  + f"</td><td data-verdict=\"{e(f.verdict)}\"><b>{e(f.verdict)}</b></td></tr>"
                  for f in fs]
        parts.append("</tbody></table>")
    parts += ["<ol class=\"rules\">", *(f"<li>{e(t)}: {e(rule)}</li>" for t, _, rule in
                                         findings.FINDINGS.values()), "</ol>"]
    return parts


def html_page(rows: list[Row], images: dict[str, dict[str, Path]], title: str,
              description: str, per_task: dict[str, list[findings.Finding]] | None = None) -> str:
    """One self-contained page: a table per task, every plot inlined as a data: URI, and the
    paper-findings tables."""
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right;white-space:nowrap}td:nth-child(-n+2),th:nth-child(-n+2)"
             "{text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:1em 0}"
             "td.text{white-space:normal;text-align:left;min-width:12em}table.findings th{text-align:left}"
             "</style>",
             "</head><body>", f"<h1>{e(title)}</h1>"]
    if description:
        parts.append(f"<p>{e(description)}</p>")
    for task in dict.fromkeys(r.task for r in rows):
        cols = columns([r for r in rows if r.task == task])
        parts += [f"<h2>Task <code>{e(task)}</code></h2>",
                  f"<table class=\"leaderboard\" data-task=\"{e(task)}\"><thead><tr>"
                  "<th>algorithm</th><th>setting</th><th>seeds</th>"
                  + "".join(f"<th>{e(t)}</th>" for _, t in cols) + "</tr></thead><tbody>"]
        for r in (r for r in rows if r.task == task):
            parts.append(f"<tr><td>{e(r.name)}</td><td>{e(r.setting)}</td><td>{len(r.seeds)}</td>"
                         + "".join(f"<td>{e(fmt(r.values.get(k)))}</td>" for k, _ in cols) + "</tr>")
        parts.append(f"</tbody></table><p class=\"agreement\">{e(agreement_line(rows, task))}</p>")
        for kind, path in images.get(task, {}).items():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            caption = plots.CAPTIONS[kind]
            parts.append(f"<figure><img alt=\"{e(caption)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{e(caption)}</figcaption></figure>")
    if per_task:
        parts += findings_html(per_task)
    parts += ["<h2>Notes</h2><ul>", *(f"<li>{e(n)}</li>" for n in NOTES), "</ul></body></html>"]
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.json``, ``findings.md``,
    ``findings.json``, the plots and ``report.html`` into ``out_dir`` (default
    ``RUN_DIR/report``); returns their paths."""
    run_dir = Path(run_dir)
    cells = load_cells(run_dir)
    if not cells:
        raise AlignlabError(f"{run_dir}: no finished cells (cells/*/*/*/seed_*/eval.json); "
                            "run `alignlab bench run` first")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    suite: dict = {}
    if (run_dir / "suite.yaml").exists():
        import yaml

        suite = yaml.safe_load((run_dir / "suite.yaml").read_text(encoding="utf-8")) or {}
    rows = aggregate(cells, suite.get("tasks"))
    name, description = suite.get("name", run_dir.name), suite.get("description", "")
    title = f"alignlab bench: {name}"
    paths = {"markdown": out / "leaderboard.md", "csv": out / "leaderboard.csv",
             "json": out / "leaderboard.json", "html": out / "report.html",
             "findings_markdown": out / "findings.md", "findings_json": out / "findings.json"}
    atomic_write_text(paths["markdown"], markdown(rows, title))
    atomic_write_text(paths["csv"], csv_text(rows))
    atomic_write_json(paths["json"], {"rows": [{
        "task": r.task, "name": r.name, "algorithm": r.algorithm, "setting": r.setting,
        "sweep": r.sweep, "seeds": r.seeds, "kl_estimator": r.kl_estimator,
        "metrics": {k: {"mean": _finite(iv.mean), "ci95": _finite(iv.half_width), "n": iv.n}
                    for k, iv in r.values.items()}} for r in rows],
        "ranking_agreement": {task: {"spearman": _finite(rho), "rows": n}
                              for task in dict.fromkeys(r.task for r in rows)
                              for rho, n in [ranking_agreement(rows, task)]}})
    per_task = {task: findings.findings(rows, cells, task) for task in dict.fromkeys(r.task for r in rows)}
    atomic_write_text(paths["findings_markdown"], findings.markdown(per_task, title))
    atomic_write_json(paths["findings_json"], findings.as_json(per_task))
    images = plots.plot_all(rows, out)
    atomic_write_text(paths["html"], html_page(rows, images, title, description, per_task))
    return {**paths, **{f"{kind}_{task}": p for task, per in images.items() for kind, p in per.items()}}


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x
