"""``alignlab bench``: run a suite of cells (resumable, in parallel processes) and report it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

bench_app = typer.Typer(help="Run benchmark suites (tasks × algorithms × sweeps × seeds) and "
                             "report them: leaderboard, reward–KL frontiers, HTML.",
                        no_args_is_help=True)
console = Console()


@bench_app.command("run")
def run(suite: Annotated[str, typer.Argument(help="A suite YAML file, or a shipped suite's name (quick).")],
        jobs: Annotated[int, typer.Option("--jobs", "-j", help="Cells run at once (processes).")] = 1,
        out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/bench/<suite name>).")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a suite field, e.g. seeds=[0,1].")] = None,
        progress: Annotated[bool, typer.Option(help="Show the live progress view.")] = True,
        report: Annotated[bool, typer.Option(help="Write the report when the suite is done.")] = True) -> None:
    """Run every cell of SUITE not yet finished in the run folder (a rerun resumes)."""
    from alignlab.bench.config import load_suite
    from alignlab.bench.report import write_report
    from alignlab.bench.runner import run_suite
    from alignlab.core.errors import AlignlabError

    cfg = load_suite(suite, set_ or [])
    run_dir = out or Path("runs/bench") / cfg.name
    result = run_suite(cfg, run_dir, jobs=jobs, progress=progress, console=console)
    console.print(f"suite {cfg.name}: {len(result.done)} jobs run, {len(result.skipped)} already "
                  f"finished (skipped), {len(result.failed)} failed, {len(result.blocked)} not "
                  f"started; {result.seconds:.0f}s → {result.run_dir}")
    for jid, why in result.failed.items():
        console.print(f"[red]failed[/red] {jid}: {why}", highlight=False)
    if report and (result.done or result.skipped):
        paths = write_report(result.run_dir)
        console.print(f"report: {paths['html']} ({paths['markdown'].name}, {paths['csv'].name})")
    if not result.ok:
        raise AlignlabError(f"{len(result.failed)} job(s) failed; rerun the same command to retry them")


@bench_app.command("report")
def report_cmd(run_dir: Annotated[Path, typer.Argument(help="A folder written by `alignlab bench run`.")],
               out: Annotated[Optional[Path], typer.Option(help="Report folder (default RUN_DIR/report).")] = None) -> None:
    """Leaderboard (Markdown, CSV), the paper-findings table, PNG plots and a self-contained
    HTML report of a run."""
    from alignlab.bench.report import write_report

    paths = write_report(run_dir, out)
    console.print(paths["markdown"].read_text(encoding="utf-8"), markup=False, highlight=False,
                  soft_wrap=True)
    console.print(paths["findings_markdown"].read_text(encoding="utf-8"), markup=False,
                  highlight=False, soft_wrap=True)
    n_plots = sum(p.suffix == ".png" for p in paths.values())
    console.print(f"wrote {paths['html']}, {paths['csv']}, {paths['findings_json']} and {n_plots} plots")
