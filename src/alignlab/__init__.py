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
