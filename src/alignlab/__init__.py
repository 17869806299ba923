"""alignlab: train language models from feedback."""

import os as _os

__version__ = "0.1.0"

# oneDNN, the CPU library behind PyTorch's bf16 (and some fp32) matmuls, keeps a compiled
# primitive with its buffers for every matmul shape it has seen, up to 1,024 of them. Batches of
# varying length make new shapes step after step, so a DPO run's peak memory grew by ~600 MB
# over 20 steps (benchmarks/README.md); at 64 it did not, at the same speed. oneDNN reads the
# variable once, at its first primitive, so it is set on import, and only where the user has
# not set it. ONEDNN_CACHE_DEFAULTED says whether this import set it (the benchmarks keep it
# from the other libraries' runs).
ONEDNN_CACHE_CAPACITY = "64"
ONEDNN_CACHE_DEFAULTED = "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in _os.environ
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)

# glibc's malloc (PyTorch's CPU allocator) mapped and unmapped a step's activations every step,
# each page zero-filled by the kernel again; alignlab.core.heap keeps them in the heap instead
# (a bf16 reference pass: 2.8 -> 2.5 s). HEAP_TUNED says whether this import did it: not where
# ALIGNLAB_HEAP_TUNING=0, the user tuned malloc themselves, or there is no glibc.
from alignlab.core.heap import tune_heap as _tune_heap  # noqa: E402 - after the oneDNN default

HEAP_TUNED = _tune_heap()
