"""Importing alignlab tunes glibc's malloc thresholds (``core/heap.py``) unless the user opted out
or tuned malloc themselves; a step's activations then stay in the heap instead of being mapped
and zero-filled again every step. Each case runs in a fresh interpreter: the settings are
per process and are made at import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignlab.core import heap

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
KNOBS = (heap.OPT_OUT, *heap.USER_SETTINGS, "GLIBC_TUNABLES")
# Five rounds of three 20 MB tensors made and freed, after two warm-up rounds: the page faults
# they cost (each fault is a 4 KiB page the kernel zero-fills).
FAULTS = """
import resource, alignlab, torch
def rounds(n):
    for _ in range(n):
        xs = [torch.ones(5_000_000) for _ in range(3)]
        del xs
rounds(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(5)
print(alignlab.HEAP_TUNED, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in KNOBS}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**base, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_tuned_heap_keeps_freed_activations_instead_of_faulting_them_in_again():
    tuned, faults_tuned = _run(FAULTS).split()
    plain, faults_plain = _run(FAULTS, ALIGNLAB_HEAP_TUNING="0").split()
    assert (tuned, plain) == ("True", "False")
    # glibc's defaults map and unmap the tensors: ~5,000 faults a tensor; tuned, the heap
    # settles after a round or two and later rounds fault (almost) nothing
    assert int(faults_plain) > 40_000, faults_plain
    assert int(faults_tuned) < int(faults_plain) / 2, (faults_tuned, faults_plain)


@pytest.mark.parametrize("env, why", [
    ({"ALIGNLAB_HEAP_TUNING": "0"}, "ALIGNLAB_HEAP_TUNING"),
    ({"ALIGNLAB_HEAP_TUNING": "off"}, "ALIGNLAB_HEAP_TUNING"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"MALLOC_MMAP_THRESHOLD_": "1000000"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, "GLIBC_TUNABLES"),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}, ""),  # not about malloc: tuned
    ({"ALIGNLAB_HEAP_TUNING": "1"}, ""),
    ({}, ""),
])
def test_the_user_s_own_malloc_settings_win(env, why):
    assert heap.user_declined(env) == why
    assert _run("import alignlab; print(alignlab.HEAP_TUNED)", **env) == str(not why)


def test_without_glibc_tuning_and_releasing_do_nothing(monkeypatch):
    import ctypes

    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(heap, "_LIBC", [])
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert heap.tune_heap() is False and heap.release_free_heap() is False and heap._LIBC == [None]


@pytest.mark.parametrize("user, alignlab_variant, other_variant", [
    (None, None, "0"),  # alignlab's variants tune the heap on import; the others keep glibc's
    ("1", "1", "1"),  # what the user set reaches every variant
])
def test_benchmark_workers_keep_glibc_s_own_heap_for_the_other_libraries(user, alignlab_variant,
                                                                          other_variant):
    code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); from _harness import worker_env; "
            f"print(worker_env('alignlab').get('{heap.OPT_OUT}'), worker_env('trl_default').get('{heap.OPT_OUT}'), "
            f"worker_env('grpo/trl').get('{heap.OPT_OUT}'))")
    got = _run(code, **({heap.OPT_OUT: user} if user else {}))
    assert got.split() == [str(alignlab_variant), other_variant, other_variant]
