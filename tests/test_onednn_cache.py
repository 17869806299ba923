"""Importing alignlab caps oneDNN's primitive cache unless the user set it; the benchmarks run
the other libraries' variants with oneDNN's own capacity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def _run(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != VAR}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**base, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_import_sets_the_cap_only_where_the_user_has_not():
    show = "import os, alignlab; print(os.environ['%s'], alignlab.ONEDNN_CACHE_DEFAULTED)" % VAR
    assert _run(show) == "64 True"
    assert _run(show, **{VAR: "7"}) == "7 False"


@pytest.mark.parametrize("user, alignlab_variant, other_variant", [
    (None, "64", "1024"),  # alignlab's default for its own variants, oneDNN's for the others
    ("7", "7", "7"),  # what the user set reaches every variant
])
def test_benchmark_workers_get_each_library_as_its_users_run_it(user, alignlab_variant, other_variant):
    code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import alignlab; from _harness import worker_env; "
            f"print(worker_env('alignlab_fast')['{VAR}'], worker_env('trl_default')['{VAR}'], "
            f"worker_env('grpo/alignlab')['{VAR}'], worker_env('grpo/trl')['{VAR}'])")
    got = _run(code, **({VAR: user} if user else {}))
    assert got.split() == [alignlab_variant, other_variant, alignlab_variant, other_variant]


def test_benchmark_worker_env_without_alignlab_imported():
    code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); from _harness import worker_env; "
            f"print(worker_env('trl_best').get('{VAR}'), worker_env('alignlab').get('{VAR}'))")
    assert _run(code) == "1024 None"  # an alignlab worker then sets its own cap on import
