"""The C heap under PyTorch's CPU tensors: how glibc's malloc keeps and gives back their memory.

PyTorch's CPU allocator is glibc's ``malloc``. By default glibc serves a request above its
*mmap threshold* with a fresh ``mmap`` and returns it with ``munmap`` when freed, and gives the
heap's free top back to the OS once it exceeds the *trim threshold*. Both thresholds start small
and grow only as large blocks are freed, so a training step's activations (tens of MB each, of
sizes that change with every batch) were mapped, zero-filled by the kernel page by page, and
unmapped again, step after step: a bf16 reference pass of the DPO benchmark took 1.3M page faults
and 2.8 s; with the thresholds below, 0.2M and 2.5 s (benchmarks/README.md).

:func:`tune_heap` fixes the mmap threshold at glibc's largest (32 MB) and the trim threshold at
1 GiB, so freed activations stay in the heap for the next step. Peak RSS, the figure the
benchmarks report, does not grow (the memory was in use at the peak anyway); the online loop
still hands the free heap back between phases with :func:`release_free_heap`. ``import
alignlab`` calls it, unless ``ALIGNLAB_HEAP_TUNING=0`` or the user tuned malloc themselves
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or ``GLIBC_TUNABLES`` naming malloc).
Where there is no glibc (macOS, musl) both functions do nothing and say so.

Standard library only: this module is imported by ``alignlab/__init__.py``, before torch.
"""

from __future__ import annotations

import ctypes
import os

OPT_OUT = "ALIGNLAB_HEAP_TUNING"
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
# glibc caps the mmap threshold at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit); mallopt refuses more.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>

_LIBC: list = []  # glibc, looked up once ([None] where there is none)


def _glibc():
    if not _LIBC:
        try:
            lib = ctypes.CDLL("libc.so.6")
        except OSError:
            lib = None
        _LIBC.append(lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None)
    return _LIBC[0]


def user_declined(environ: dict[str, str] | None = None) -> str:
    """Why the heap is left as it is (the variable that says so), or "" to tune it."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return OPT_OUT
    for name in USER_SETTINGS:
        if name in env:
            return name
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return ""


def tune_heap() -> bool:
    """Set glibc's mmap and trim thresholds (module docstring); True when they were set."""
    lib = _glibc()
    if lib is None or user_declined():
        return False
    mapped = lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trimmed = lib.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mapped and trimmed)  # mallopt returns 1 on success


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim(0)``); False where
    there is no glibc. The online loop calls it after each rollout and each update: their
    tensors of ever-changing sizes leave freed memory scattered over the heap, which the next
    phase does not reuse, so a process's peak RSS grew step after step (GRPO benchmark in bf16:
    2.0 GB after 2 steps, 2.8 after 6, 3.7 after 20; with the calls 2.4 after 6, at the same
    speed)."""
    lib = _glibc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True


__all__ = ["MMAP_THRESHOLD", "OPT_OUT", "TRIM_THRESHOLD", "release_free_heap", "tune_heap", "user_declined"]
