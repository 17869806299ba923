"""``alignlab bench run``: the suite's jobs as separate processes, at most ``jobs`` at once, in
dependency order, with one progress view; finished jobs are skipped (resume).

Each job runs ``python -m alignlab.bench.worker JOB_DIR`` with its output in ``JOB_DIR/log.txt``
and ``ALIGNLAB_BENCH_THREADS`` = the cores divided among the running jobs. A job that fails is
reported with the end of its log; the jobs that need it are not started; the others go on. On
Ctrl-C every running job gets SIGTERM (its training writes a checkpoint) and the run stops;
running the suite again continues where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from alignlab.bench.config import SuiteConfig
from alignlab.bench.plan import Job, plan
from alignlab.core.config import dump_config
from alignlab.core.errors import AlignlabError, ConfigError
from alignlab.core.io import atomic_write_json, atomic_write_text

POLL_S = 0.5


@dataclass
class SuiteRun:
    run_dir: Path
    jobs: int
    skipped: list[str] = field(default_factory=list)
    """Finished before this run started: not redone."""
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """Job → the end of its log."""
    blocked: list[str] = field(default_factory=list)
    """Not started: a job they need failed."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def _normalised(spec: dict[str, Any], run_dir: Path) -> str:
    return json.dumps(spec, sort_keys=True).replace(str(run_dir), "<run>")


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _changed_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def check_run_dir(jobs: list[Job], run_dir: Path) -> None:
    """A finished job whose stored ``job.json`` differs from the suite's is an error (it would be
    skipped with results of another config); an unfinished one is cleared and rerun."""
    conflicts = []
    for job in jobs:
        stored = job.dir(run_dir) / "job.json"
        if not stored.exists():
            continue
        old = json.loads(stored.read_text(encoding="utf-8"))
        if _normalised(old, run_dir) == _normalised(job.spec, run_dir):
            continue
        if job.finished(run_dir):
            keys = _changed_keys(json.loads(_normalised(old, run_dir)),
                                 json.loads(_normalised(job.spec, run_dir)))
            conflicts.append(f"{job.id} (changed: {', '.join(keys[:4])})")
        else:
            shutil.rmtree(job.dir(run_dir))
    if conflicts:
        raise ConfigError(f"{run_dir} holds finished cells of another configuration: "
                          f"{'; '.join(conflicts[:3])}{' …' if len(conflicts) > 3 else ''}; "
                          "use another --out, or delete those folders to redo them")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _metrics_path(job: Job) -> Path | None:
    cfg = job.spec.get("config") or (job.spec.get("train") or {}).get("config")
    return Path(cfg["train"]["output_dir"]) / "metrics.jsonl" if cfg else None


def _last_step(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            last = f.read().decode("utf-8", errors="replace").strip().splitlines()[-1]
        return int(json.loads(last)["step"])
    except (OSError, ValueError, KeyError, IndexError):
        return 0


class _View:
    """The whole suite in one rich progress view: a bar of finished jobs, one line per running
    job (its phase and training step); or one plain line per event when not interactive."""

    def __init__(self, name: str, total: int, done: int, enabled: bool, console: Console) -> None:
        self.console, self.enabled = console, enabled
        self.rows: dict[str, Any] = {}
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                console=console, transient=False)
            self.suite = self.bar.add_task(f"[bold]suite {name}", total=total, completed=done, info="")
            self.bar.start()

    def started(self, job: Job) -> None:
        if self.enabled:
            self.rows[job.id] = self.bar.add_task(f"  {job.id}", total=job.total_steps, info="starting")
        else:
            self.console.print(f"start {job.id}", highlight=False)

    def update(self, job: Job, run_dir: Path) -> None:
        if not self.enabled:
            return
        phase = (job.dir(run_dir) / "phase")
        info = phase.read_text().strip() if phase.exists() else "starting"
        self.bar.update(self.rows[job.id], completed=_last_step(_metrics_path(job)), info=info)

    def finished(self, job: Job, status: str, seconds: float) -> None:
        if self.enabled:
            self.bar.remove_task(self.rows.pop(job.id))
            self.bar.advance(self.suite)
            if status != "done":
                self.console.print(f"[red]{status}[/red] {job.id}", highlight=False)
        else:
            self.console.print(f"{status} {job.id} ({seconds:.1f}s)", highlight=False)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


def run_suite(suite: SuiteConfig, run_dir: str | Path, *, jobs: int = 1, progress: bool = True,
              console: Console | None = None, python: str = sys.executable,
              cores: int | None = None) -> SuiteRun:
    """Run every unfinished job of ``suite`` under ``run_dir``; see the module docstring."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    console = console or Console()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    all_jobs = plan(suite, run_dir)
    check_run_dir(all_jobs, run_dir)
    atomic_write_text(run_dir / "suite.yaml", dump_config(suite))
    result = SuiteRun(run_dir, len(all_jobs))
    status: dict[str, str] = {}
    for job in all_jobs:
        if job.finished(run_dir):
            status[job.id] = "skipped"
            result.skipped.append(job.id)
    pending = [j for j in all_jobs if j.id not in status]
    if pending:  # built here once: jobs started together would each build it in the same place
        from alignlab.world.build import ensure_world

        ensure_world(suite.world.preset, suite.world.seed, suite.world.cache_dir, progress=progress)
    threads = max(1, (cores or os.cpu_count() or 1) // jobs)
    env = {**os.environ, "ALIGNLAB_BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    running: dict[str, tuple[Job, subprocess.Popen, float, Any]] = {}
    view = _View(suite.name, len(all_jobs), len(result.skipped), progress, console)
    t0 = time.time()
    timings: dict[str, float] = {}
    try:
        while pending or running:
            for job in list(pending):
                if any(status.get(d) in ("failed", "blocked") for d in job.deps):
                    pending.remove(job)
                    status[job.id] = "blocked"
                    result.blocked.append(job.id)
                    view.finished(job, "blocked", 0.0)
            ready = [j for j in pending if all(status.get(d) in ("done", "skipped") for d in j.deps)]
            for job in ready[:max(0, jobs - len(running))]:
                pending.remove(job)
                d = job.dir(run_dir)
                d.mkdir(parents=True, exist_ok=True)
                atomic_write_json(d / "job.json", job.spec)
                log = (d / "log.txt").open("w", encoding="utf-8")
                proc = subprocess.Popen([python, "-m", "alignlab.bench.worker", str(d)], stdout=log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
                running[job.id] = (job, proc, time.time(), log)
                view.started(job)
            time.sleep(POLL_S if running else 0)
            for jid, (job, proc, start, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    view.update(job, run_dir)
                    continue
                log.close()
                del running[jid]
                timings[jid] = round(time.time() - start, 2)
                if rc == 0 and job.finished(run_dir):
                    status[jid] = "done"
                    result.done.append(jid)
                else:
                    status[jid] = "failed"
                    result.failed[jid] = f"exit code {rc}\n{_tail(job.dir(run_dir) / 'log.txt')}"
                view.finished(job, status[jid], timings[jid])
            if not running and pending and not any(
                    all(status.get(d) in ("done", "skipped") for d in j.deps) for j in pending):
                raise AlignlabError(f"jobs wait on jobs that never run: {[j.id for j in pending][:3]}")
    except KeyboardInterrupt:
        _stop(running)
        raise
    finally:
        view.close()
        result.seconds = time.time() - t0
        atomic_write_json(run_dir / "run_status.json", {
            "seconds": round(result.seconds, 2), "jobs": jobs, "threads_per_job": threads,
            "status": status, "job_seconds": timings})
    return result


def _stop(running: dict[str, tuple[Job, subprocess.Popen, float, Any]]) -> None:
    """SIGTERM to each running job (its training checkpoints and stops), then wait; kill those
    still running after 60 s."""
    for _, proc, _, _ in running.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + 60
    for _, proc, _, log in running.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
