"""What the side-by-side benchmarks share: each variant runs in its own subprocess (so its peak
memory is its own) and reports one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

RESULT = "RESULT "


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that across
    exec, so a worker would inherit the parent's high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)


def report(result: dict) -> None:
    """Called in a worker: hand the result to the parent."""
    print(RESULT + json.dumps(result), flush=True)


def require_trl() -> None:
    """Stop with the install command where TRL (the other side of every comparison) is absent."""
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("trl is not installed: pip install -e '.[bench]' (this script installs nothing)")


def run_variant(script: str, args: argparse.Namespace, variant: str, folder: Path,
                skip: tuple[str, ...] = ()) -> dict:
    """Re-run ``script`` with the same options as ``--worker variant``; its result dict."""
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("worker", "folder", *skip)]
    cmd = [sys.executable, script, *passthrough, "--worker", variant, "--folder", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(variant))
    line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT)), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len(RESULT):])


ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_OWN_DEFAULT = "1024"  # oneDNN's own capacity, where nobody sets one
HEAP_TUNING = "ALIGNLAB_HEAP_TUNING"  # alignlab.core.heap.OPT_OUT


def worker_env(variant: str) -> dict[str, str]:
    """The environment a variant runs in: this one's, except that the other libraries'
    variants (TRL, ``generate``) get oneDNN's own primitive-cache capacity, not the cap
    importing alignlab sets (``alignlab.ONEDNN_CACHE_DEFAULTED``; their workers import alignlab
    too), and glibc's own malloc thresholds (``ALIGNLAB_HEAP_TUNING=0``): they run as their
    users run them. A capacity or heap setting the user set reaches every variant."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    defaulted = getattr(sys.modules.get("alignlab"), "ONEDNN_CACHE_DEFAULTED", False)
    user_set = ONEDNN_CACHE in os.environ and not defaulted
    if "alignlab" not in variant and not user_set:
        env[ONEDNN_CACHE] = ONEDNN_OWN_DEFAULT
    if "alignlab" not in variant and HEAP_TUNING not in os.environ:
        env[HEAP_TUNING] = "0"  # glibc's own malloc thresholds (alignlab/core/heap.py)
    return env


def step_timer():
    """A transformers ``TrainerCallback`` that keeps each optimizer step's wall time in
    ``.seconds`` (for TRL's trainers: generation, forward, backward and update)."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._t)

    return StepTimer()
