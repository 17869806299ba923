#!/usr/bin/env python
"""Mutation testing of alignlab's numerical core: do the tests fail when the code is wrong?

Each *mutant* is one small, behaviour-changing edit of one module (``+`` → ``-``, ``<`` → ``<=``,
``.mean()`` → ``.sum()``, a dropped statement or keyword argument, 0 → 1, ...). For each one the
tests that cover that module run (``TARGETS``); a mutant is *killed* when they fail, time out or
crash, and *survives* when they pass. See docs/mutation.md for the run time, the score and the
survivors that are equivalent to the original code.

    python tools/mutate.py                       # every module (make mutation)
    python tools/mutate.py --module losses/policy --sample 40
    python tools/mutate.py --list --module annotator

By default each mutant runs in a forked child of this process, which has already imported torch
and transformers (the slow part of starting pytest) but not alignlab: the child imports the
mutated module from memory, so no file is ever changed. ``--inplace`` instead rewrites the file
for a ``python -m pytest`` subprocess and restores it in a ``finally`` (also on Ctrl-C and
SIGTERM); use it where fork is unavailable or a test needs the mutant in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.abc
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    from tools.mutants import EQUIVALENTS, ROOT, Mutant, find_mutants, read_equivalents
except ImportError:  # run as ``python tools/mutate.py``: tools/ is on sys.path, not the root
    from mutants import EQUIVALENTS, ROOT, Mutant, find_mutants, read_equivalents  # type: ignore[no-redef]

_PREFERENCE_TESTS = [
    "tests/test_losses_preference_pairwise.py",
    "tests/test_losses_preference_reference_free.py",
    "tests/test_losses_preference_unpaired.py",
    "tests/test_losses_preference_listwise.py",
    "tests/test_losses_preference_registry.py",
    "tests/test_losses_preference_rso.py",
    "tests/test_losses_preference_metrics.py",
    "tests/test_losses_defaults.py",
]

# module → the fast unit tests that cover it (in the order they run; the first failure stops).
TARGETS: dict[str, list[str]] = {
    **{f"src/alignlab/losses/preference/{name}.py": _PREFERENCE_TESTS
       for name in ("base", "pairwise", "divergences", "listwise", "reference_free",
                    "unpaired", "weighted", "combine")},
    "src/alignlab/losses/advantages.py": ["tests/test_losses_advantages.py",
                                          "tests/test_losses_advantages_values.py",
                                          "tests/test_losses_value.py",
                                          "tests/test_losses_policy.py",
                                          "tests/test_losses_policy_metrics.py",
                                          "tests/test_losses_defaults.py"],
    "src/alignlab/losses/kl.py": ["tests/test_losses_kl.py", "tests/test_losses_advantages.py",
                                  "tests/test_losses_advantages_values.py",
                                  "tests/test_losses_policy.py"],
    "src/alignlab/losses/policy.py": ["tests/test_losses_policy.py",
                                      "tests/test_losses_policy_metrics.py",
                                      "tests/test_losses_defaults.py"],
    "src/alignlab/losses/rollout_correction.py": ["tests/test_losses_policy.py",
                                                  "tests/test_losses_policy_metrics.py",
                                                  "tests/test_losses_defaults.py"],
    "src/alignlab/losses/value.py": ["tests/test_losses_value.py",
                                     "tests/test_losses_policy_metrics.py",
                                     "tests/test_losses_defaults.py"],
    "src/alignlab/losses/reward.py": ["tests/test_losses_reward.py"],
    "src/alignlab/models/backbone.py": ["tests/test_models_logprobs_chunked.py"],
    "src/alignlab/models/logprobs.py": ["tests/test_models_logprobs_chunked.py"],
    "src/alignlab/engine/loop.py": ["tests/test_engine_optimizer.py",
                                    "tests/test_engine_train_loop.py"],
    "src/alignlab/engine/learner.py": ["tests/test_engine_optimizer.py"],
    "src/alignlab/rewards/annotator.py": ["tests/test_rewards_annotator.py",
                                          "tests/test_rewards_annotator_values.py"],
}

# Only these top-level functions/classes of a module are mutated (the rest: every one). In
# logprobs.py that is the computation; finding a model's decoder and head is covered by the
# slower model tests (tests/test_models_logprobs.py).
SCOPE: dict[str, set[str]] = {
    "src/alignlab/models/backbone.py": {
        "_compute_dtype", "_chunk_logits", "_ChunkedLogProb", "chunked_logprobs",
        "scored_positions"},
    "src/alignlab/models/logprobs.py": {"token_logprobs", "_sequence_ids", "sequence_logprobs"},
}

# The hand-made mutants of issue 16 (survivors and weak kills before its tests), run by --hand:
# (module, what, original text, mutated text).
HAND_MUTANTS = [
    ("src/alignlab/losses/preference/weighted.py", "sparse_po rejected with the chosen mask",
     "b = reward(inputs.rejected_token_logps, inputs.ref_rejected_token_logps, inputs.rejected_mask,",
     "b = reward(inputs.rejected_token_logps, inputs.ref_rejected_token_logps, inputs.chosen_mask,"),
    ("src/alignlab/losses/preference/base.py", "accuracies as a sum",
     'out["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean()',
     'out["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().sum()'),
    ("src/alignlab/losses/preference/unpaired.py", "aot_unpaired drops label_smoothing",
     "losses = smoothed_sigmoid_loss(beta * (qg - qb), label_smoothing)",
     "losses = smoothed_sigmoid_loss(beta * (qg - qb))"),
    ("src/alignlab/losses/preference/pairwise.py", "aot_unpaired_on_pairs drops label_smoothing",
     "delta = torch.sort(a).values - torch.sort(b).values\n    losses = smoothed_sigmoid_loss(beta * delta, label_smoothing)",
     "delta = torch.sort(a).values - torch.sort(b).values\n    losses = smoothed_sigmoid_loss(beta * delta)"),
    ("src/alignlab/losses/preference/reference_free.py", "simpo drops label_smoothing",
     "losses = smoothed_sigmoid_loss(chosen - rejected - gamma, label_smoothing)",
     "losses = smoothed_sigmoid_loss(chosen - rejected - gamma)"),
    ("src/alignlab/losses/preference/reference_free.py", "cpo drops label_smoothing",
     "losses = smoothed_sigmoid_loss(chosen - rejected, label_smoothing) + alpha * nll",
     "losses = smoothed_sigmoid_loss(chosen - rejected) + alpha * nll"),
    ("src/alignlab/losses/policy.py", "approx_kl with the wrong sign",
     '"approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),',
     '"approx_kl": masked_mean(log_ratio - (ratio - 1.0), mask),'),
    ("src/alignlab/rewards/annotator.py", "tie rule < instead of <=",
     "abs(gold[0] - gold[1]) <= self.tie_margin", "abs(gold[0] - gold[1]) < self.tie_margin"),
    ("src/alignlab/engine/loop.py", "optimizer steps before clipping and the finiteness check",
     "    grad_norm = (torch.nn.utils.clip_grad_norm_(",
     "    opt.step()\n    grad_norm = (torch.nn.utils.clip_grad_norm_("),
    ("src/alignlab/engine/loop.py", "scheduler steps twice per update (train)",
     "            sched.step()\n", "            sched.step()\n            sched.step()\n"),
    ("src/alignlab/engine/learner.py", "scheduler steps twice per update (Learner)",
     "        self.scheduler.step()\n", "        self.scheduler.step()\n        self.scheduler.step()\n"),
]

PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "not slow",
               "--no-header"]

# ---- running a mutant ----------------------------------------------------------------------

def module_name(path: str) -> str:
    """``src/alignlab/losses/kl.py`` → ``alignlab.losses.kl``."""
    parts = list(Path(path).with_suffix("").parts)
    return ".".join(parts[1:] if parts[0] == "src" else parts)


class _SourceLoader(importlib.abc.Loader):
    def __init__(self, path: str, source: str) -> None:
        self.path, self.source = path, source

    def create_module(self, spec):  # noqa: ANN001
        return None

    def exec_module(self, module) -> None:  # noqa: ANN001
        exec(compile(self.source, self.path, "exec"), module.__dict__)


class MutantImporter(importlib.abc.MetaPathFinder):
    """Serves one module from a source string instead of its file."""

    def __init__(self, name: str, path: str, source: str) -> None:
        self.name, self.path, self.source = name, path, source

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname != self.name:
            return None
        spec = importlib.util.spec_from_loader(fullname, _SourceLoader(self.path, self.source),
                                               origin=self.path)
        spec.has_location = True
        return spec


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


_CHILDREN: set[int] = set()  # running children, killed if this process is interrupted


def start_forked(path: str, source: str | None, tests: list[str]) -> int:
    """Fork a child that runs ``tests`` with the module at ``path`` replaced by ``source``
    (None: the original) in its own process group; its exit code is pytest's."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            os.setpgid(0, 0)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            if source is not None:
                sys.meta_path.insert(0, MutantImporter(module_name(path), str(ROOT / path), source))
            import pytest

            code = int(pytest.main([*PYTEST_ARGS, *tests]))
        finally:
            os._exit(code)
    _CHILDREN.add(pid)
    return pid


def run_forked(jobs: list[tuple[str, str | None, list[str], float]], workers: int = 1
               ) -> Iterator[tuple[int, int | None]]:
    """Run each ``(path, source, tests, timeout)`` in a forked child, ``workers`` at a time;
    yields ``(index, exit code or None on timeout)`` as they finish."""
    pending = list(enumerate(jobs))
    running: dict[int, tuple[int, float]] = {}
    while pending or running:
        while pending and len(running) < workers:
            i, (path, source, tests, timeout) = pending.pop(0)
            running[start_forked(path, source, tests)] = (i, time.monotonic() + timeout)
        for pid, (i, deadline) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                _kill_group(pid)
                os.waitpid(pid, 0)
                code = None
            else:
                continue
            del running[pid]
            _CHILDREN.discard(pid)
            yield i, code
        time.sleep(0.02)


@contextlib.contextmanager
def mutated_file(path: Path, source: str) -> Iterator[None]:
    """``path`` holds ``source`` inside the block and its original bytes afterwards, whatever
    happens inside (an exception, Ctrl-C, SIGTERM turned into KeyboardInterrupt by ``main``)."""
    original = path.read_bytes()
    try:
        path.write_bytes(source.encode("utf-8"))
        yield
    finally:
        path.write_bytes(original)
        # A bytecode cache of the mutant must never be mistaken for the restored file.
        for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
            with contextlib.suppress(OSError):
                pyc.unlink()


def run_inplace(path: str, source: str | None, tests: list[str], timeout: float,
                root: Path = ROOT) -> int | None:
    """Run ``tests`` in a subprocess with the file at ``path`` rewritten to ``source``."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests]
    with contextlib.ExitStack() as stack:
        if source is not None:
            stack.enter_context(mutated_file(root / path, source))
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        _CHILDREN.add(proc.pid)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            return None
        finally:
            _CHILDREN.discard(proc.pid)


def verdict(code: int | None) -> str:
    """pytest's exit code → killed / survived / timeout / error (the tests could not run)."""
    if code is None:
        return "timeout"
    if code == 0:
        return "survived"
    if code in (1, 2) or code < 0:  # failed, collection/import error, or crashed by a signal
        return "killed"
    return "error"


# ---- the command ---------------------------------------------------------------------------

def _preimport() -> None:
    """Import the heavy dependencies once, before forking (never alignlab itself)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import hypothesis  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401

    assert "alignlab" not in sys.modules, "alignlab must be imported by each child, not here"


_SIGNAL: list[str] = []


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends a run like Ctrl-C: children killed, a rewritten file restored, results shown."""
    _SIGNAL.append(signal.Signals(signum).name)
    raise KeyboardInterrupt


def _result_key(m: Mutant, source: str) -> str:
    """A mutant's identity for --results: the module's exact source and the edit."""
    blob = json.dumps([hashlib.sha256(source.encode()).hexdigest(), m.path, m.start, m.end,
                       m.op, m.mutated])
    return hashlib.sha256(blob.encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", default=[],
                    help="only modules whose path contains this (repeatable)")
    ap.add_argument("--sample", type=int, help="run a random sample of N mutants")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="minimum per-mutant timeout in seconds (at least 5x the clean run)")
    ap.add_argument("-j", "--jobs", type=int, default=1,
                    help="mutants run at once (forked mode only)")
    ap.add_argument("--inplace", action="store_true",
                    help="rewrite the file for a pytest subprocess instead of forking")
    ap.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    ap.add_argument("--hand", action="store_true",
                    help="run only the hand-made mutants of issue 16 (HAND_MUTANTS)")
    ap.add_argument("--results", type=Path,
                    help="append each outcome to this JSONL file and skip the mutants already in "
                         "it (to resume an interrupted run; delete it after changing the tests)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every mutant's result")
    args = ap.parse_args(argv)

    if args.hand:
        return run_hand_mutants(args.jobs)
    modules = [m for m in TARGETS if not args.module or any(s in m for s in args.module)]
    if not modules:
        ap.error(f"no module matches {args.module}; modules: {', '.join(TARGETS)}")
    mutants = [m for mod in modules for m in find_mutants(ROOT / mod, scope=SCOPE.get(mod))]
    if args.sample is not None and args.sample < len(mutants):
        picked = random.Random(args.seed).sample(range(len(mutants)), args.sample)
        mutants = [mutants[i] for i in sorted(picked)]
    if args.list:
        for m in mutants:
            print(m.describe())
        print(f"{len(mutants)} mutants in {len(modules)} modules")
        return 0

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT / "src"))
    signal.signal(signal.SIGTERM, _interrupt)
    if not args.inplace:
        _preimport()

    def run(jobs: list[tuple[str, str | None, list[str], float]]) -> Iterator[tuple[int, int | None]]:
        if not args.inplace:
            return run_forked(jobs, args.jobs)
        return ((i, run_inplace(*job)) for i, job in enumerate(jobs))

    t0 = time.time()
    results: dict[str, list[tuple[Mutant, str]]] = {}
    done: dict[str, str] = {}
    if args.results is not None and args.results.exists():
        for line in args.results.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                done[entry["key"]] = entry["outcome"]
    try:
        for mod in sorted({m.path for m in mutants}):
            tests = TARGETS[mod]
            start = time.time()
            [(_, code)] = run([(mod, None, tests, 600.0)])
            if code != 0:
                print(f"{mod}: its tests fail without any mutation (exit {code}); skipped",
                      flush=True)
                continue
            timeout = max(args.timeout, 5 * (time.time() - start))
            own = [m for m in mutants if m.path == mod]
            print(f"{mod}: {len(own)} mutants, clean run {time.time() - start:.1f}s", flush=True)
            source = (ROOT / mod).read_text(encoding="utf-8")
            rows = results.setdefault(mod, [])
            todo = []
            for m in own:
                if _result_key(m, source) in done:
                    rows.append((m, done[_result_key(m, source)]))
                else:
                    todo.append(m)
            for i, code in run([(mod, m.apply(source), tests, timeout) for m in todo]):
                outcome = verdict(code)
                rows.append((todo[i], outcome))
                if args.results is not None:
                    with args.results.open("a", encoding="utf-8") as f:
                        f.write(json.dumps({"key": _result_key(todo[i], source),
                                            "outcome": outcome}) + "\n")
                if args.verbose or outcome in ("survived", "error"):
                    print(f"  {outcome:8s} {todo[i].describe()}", flush=True)
            rows.sort(key=lambda r: (r[0].start, r[0].op))
    except KeyboardInterrupt:
        for pid in list(_CHILDREN):
            _kill_group(pid)
        print(f"\ninterrupted ({_SIGNAL[0] if _SIGNAL else 'Ctrl-C'}); the results so far:")
    report(results, time.time() - t0, sampled=args.sample is not None)
    return 0


def run_hand_mutants(workers: int) -> int:
    """Run ``HAND_MUTANTS``; exit status 1 if any survives."""
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT / "src"))
    _preimport()
    jobs = []
    for path, what, old, new in HAND_MUTANTS:
        source = (ROOT / path).read_text(encoding="utf-8")
        if source.count(old) != 1:
            raise SystemExit(f"hand mutant {what!r}: its original text is no longer in {path}")
        jobs.append((path, source.replace(old, new), TARGETS[path], 300.0))
    survived = 0
    for i, code in run_forked(jobs, workers):
        outcome = verdict(code)
        survived += outcome != "killed"
        print(f"{outcome:9s} {HAND_MUTANTS[i][0]}: {HAND_MUTANTS[i][1]}", flush=True)
    return int(survived > 0)


def report(results: dict[str, list[tuple[Mutant, str]]], seconds: float, sampled: bool) -> None:
    """Per module: killed / scored mutants (a timeout counts as killed; "error" is not scored),
    and the score with the known equivalent survivors left out; then every other survivor."""
    equivalent = read_equivalents()
    print(f"\n{'module':45s} {'killed':>7s} {'total':>6s} {'score':>7s} {'equiv':>6s} "
          f"{'w/o equiv':>9s}")
    totals = [0, 0, 0]

    def row(name: str, killed: int, total: int, equiv: int) -> str:
        return (f"{name:45s} {killed:7d} {total:6d} {100 * killed / max(total, 1):6.1f}% "
                f"{equiv:6d} {100 * killed / max(total - equiv, 1):8.1f}%")

    for mod, rows in results.items():
        scored = [(m, o) for m, o in rows if o != "error"]
        killed = sum(o in ("killed", "timeout") for _, o in scored)
        equiv = sum(o == "survived" and m.key() in equivalent for m, o in scored)
        totals = [totals[0] + killed, totals[1] + len(scored), totals[2] + equiv]
        print(row(mod, killed, len(scored), equiv))
    print(row("overall" + (" (sampled)" if sampled else ""), *totals)
          + f"   in {seconds / 60:.1f} min")
    survivors = [m for rows in results.values() for m, o in rows if o == "survived"]
    known = [m for m in survivors if m.key() in equivalent]
    new = [m for m in survivors if m.key() not in equivalent]
    errors = [m for rows in results.values() for m, o in rows if o == "error"]
    if known:
        print(f"\n{len(known)} surviving mutants known to be equivalent ({EQUIVALENTS.name}):")
        for m in known:
            print(f"  {m.describe()}\n      {equivalent[m.key()]}")
    if new:
        print(f"\n{len(new)} surviving mutants (a missing test, or add them to {EQUIVALENTS.name} "
              "with the reason they are equivalent):")
        for m in new:
            print(f"  {m.describe()}")
    if errors:
        print(f"\n{len(errors)} mutants whose tests could not run (not scored):")
        for m in errors:
            print(f"  {m.describe()}")


if __name__ == "__main__":
    sys.exit(main())
