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
# Where a 28 MB tensor (an activation's size) comes from, and whether freeing it gives the memory
# back: glibc's program break (the heap's end) before, after making it, and after freeing it.
# Page-fault counts, what the tuning saves, vary from run to run with the heap's layout (a CI run
# saw glibc's own thresholds settle after a few rounds); the break says what malloc did.
HEAP = """
import ctypes, alignlab, torch
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
start = libc.sbrk(0)
x = torch.empty(7_000_000)
made = libc.sbrk(0)
from_heap = start - (1 << 30) < x.data_ptr() < made
del x
print(alignlab.HEAP_TUNED, (made - start) >> 20, (libc.sbrk(0) - start) >> 20, from_heap)
"""


def _run(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in KNOBS}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**base, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_tuned_heap_serves_activations_from_the_heap_and_keeps_them_when_freed():
    tuned = _run(HEAP).split()
    plain = _run(HEAP, ALIGNLAB_HEAP_TUNING="0").split()
    # tuned: the tensor extends the heap (most of its 27 MiB; the rest was free already) and
    # the heap keeps that memory for the next step's tensors after it is freed
    assert tuned[0] == "True" and int(tuned[1]) >= 20 and tuned[2] == tuned[1], tuned
    assert tuned[3] == "True", tuned
    # glibc's defaults: a block that size is mapped apart (the heap does not move), and
    # unmapped when freed, to be mapped and zero-filled again next time
    assert plain == ["False", "0", "0", "False"], plain


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
