"""Run untrusted Python (model output) in a separate, resource-limited subprocess.

``run_code(program, Limits(...))`` writes the program to a fresh temporary directory and runs
it there with ``python -I`` (isolated: no user site, no ``PYTHON*`` variables, script dir not
on ``sys.path``), an almost empty environment, stdin from ``/dev/null`` (or a given text) and
its own process group. Before the program starts, a prelude sets

- ``RLIMIT_AS`` (address space, ``memory_mb``): an allocation past it raises ``MemoryError``;
- ``RLIMIT_CPU`` (``ceil(timeout_s) + 1`` s): a busy loop is killed even if the parent dies;
- ``RLIMIT_FSIZE`` (``max_output_bytes``): stdout/stderr go to files, so a program that prints
  forever gets ``EFBIG`` (Python ignores ``SIGXFSZ``) instead of filling memory or disk;
- ``RLIMIT_CORE`` 0.

The parent waits ``timeout_s`` of wall-clock time and then kills the whole process group, so
grandchildren (``subprocess``, ``multiprocessing``) go too. The limits are set by the child
itself rather than in ``preexec_fn``, which can deadlock in a parent with threads (torch's).

This is a limit on *resources*, not a security boundary: the program runs as the same user and
can read whatever that user can. Run untrusted code inside a container as well.

``run_python`` is the shared machinery; ``alignlab.rewards.worker`` uses it to run a user
reward function with limits.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignlab.core.errors import ConfigError

Status = Literal["ok", "timeout", "memory", "output_limit", "error"]

# Printed by the prelude when the program dies of MemoryError, so "memory" is told apart from
# any other failure without parsing tracebacks.
MEMORY_MARKER = "[alignlab-sandbox] MemoryError"


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run (``None``: no memory limit)."""

    timeout_s: float = 5.0
    memory_mb: int | None = 256
    max_output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ConfigError(f"sandbox timeout_s must be a number > 0, got {self.timeout_s!r}")
        if self.memory_mb is not None and not (isinstance(self.memory_mb, int) and self.memory_mb > 0):
            raise ConfigError(f"sandbox memory_mb must be an integer > 0 or null, got {self.memory_mb!r}")
        if not (isinstance(self.max_output_bytes, int) and self.max_output_bytes > 0):
            raise ConfigError(f"sandbox max_output_bytes must be an integer > 0, "
                              f"got {self.max_output_bytes!r}")


@dataclass
class SandboxResult:
    status: Status
    """``ok`` (exit code 0), ``timeout`` (wall clock or CPU limit), ``memory`` (MemoryError),
    ``output_limit`` (wrote more than ``max_output_bytes``) or ``error`` (anything else)."""
    stdout: str
    stderr: str
    returncode: int | None
    """Negative: killed by that signal (as ``subprocess``)."""
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _prelude(limits: Limits) -> str:
    """Python source that limits the current process; runs first in the child."""
    lines = ["import resource as _r",
             "_r.setrlimit(_r.RLIMIT_CORE, (0, 0))",
             f"_r.setrlimit(_r.RLIMIT_FSIZE, ({limits.max_output_bytes}, {limits.max_output_bytes}))"]
    cpu = math.ceil(limits.timeout_s) + 1
    lines.append(f"_r.setrlimit(_r.RLIMIT_CPU, ({cpu}, {cpu + 1}))")
    if limits.memory_mb is not None:
        n = limits.memory_mb * 1024 * 1024
        lines.append(f"_r.setrlimit(_r.RLIMIT_AS, ({n}, {n}))")
    lines.append("del _r")
    return "\n".join(lines) + "\n"


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(returncode: int | None, stderr: str, timed_out: bool, capped: bool) -> Status:
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if capped or returncode == -signal.SIGXFSZ:
        return "output_limit"
    if MEMORY_MARKER in stderr or stderr.rstrip().endswith("MemoryError"):
        return "memory"
    return "ok" if returncode == 0 else "error"


def minimal_env(home: str) -> dict[str, str]:
    """The child's whole environment: no tokens, proxies or paths of the parent leak in."""
    return {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1"}


def run_python(source: str, limits: Limits = Limits(), *, args: Sequence[str] = (),
               files: Mapping[str, str] | None = None, stdin: str | None = None,
               isolated: bool = True, env: Mapping[str, str] | None = None) -> SandboxResult:
    """Run ``python [-I] -c <prelude + source> *args`` in a fresh temp dir (its cwd and HOME).

    ``files`` are written into the temp dir first; ``env`` replaces the minimal environment.
    Never raises for anything the child does: the outcome is in the result's ``status``.
    """
    with tempfile.TemporaryDirectory(prefix="alignlab-sandbox-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        for name, text in (files or {}).items():
            (work / name).write_text(text, encoding="utf-8")
        (work / ".stdin").write_text(stdin or "", encoding="utf-8")
        argv = [sys.executable, *(["-I"] if isolated else []), "-c", _prelude(limits) + source,
                *args]
        out_path, err_path = work / ".stdout", work / ".stderr"
        start = time.monotonic()
        timed_out = False
        with open(work / ".stdin", "rb") as fin, open(out_path, "wb") as fout, \
                open(err_path, "wb") as ferr:
            proc = subprocess.Popen(argv, cwd=work, stdin=fin, stdout=fout, stderr=ferr,
                                    env=dict(env) if env is not None else minimal_env(tmp),
                                    start_new_session=True, close_fds=True)
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Also after a normal exit: background children of the program must not linger.
                _kill_group(proc)
                proc.wait()
        seconds = time.monotonic() - start
        stdout = _read_capped(out_path, limits.max_output_bytes)
        stderr = _read_capped(err_path, limits.max_output_bytes)
        capped = max(out_path.stat().st_size, err_path.stat().st_size) >= limits.max_output_bytes
    status = _classify(proc.returncode, stderr, timed_out, capped)
    return SandboxResult(status, stdout, stderr, proc.returncode, seconds)


_RUN_MAIN = f"""
import os, runpy, sys
sys.argv = ["main.py"]
try:
    runpy.run_path("main.py", run_name="__main__")
except MemoryError:
    os.write(2, b"\\n{MEMORY_MARKER}\\n")
    os._exit(1)
"""


def run_code(program: str, limits: Limits = Limits(), *, stdin: str | None = None) -> SandboxResult:
    """Run a Python ``program`` (untrusted text) as ``main.py`` in the sandbox (module doc)."""
    return run_python(_RUN_MAIN, limits, files={"main.py": program}, stdin=stdin)


__all__ = ["Limits", "SandboxResult", "run_code", "run_python", "minimal_env", "MEMORY_MARKER"]
