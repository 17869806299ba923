"""The speed-ups behind :mod:`alignlab.models.logprobs`; private to ``alignlab.models``.

Prefix sharing in one pass (``packed_groups``) or two (``two_pass``), flat RL batches viewed as
groups (``shared_tokens``), per-sequence attention of packed batches (``packed_groups``), CPU
attention as matmuls (``cpu_attention``) and last-layer row skipping (``last_layer``).
:func:`alignlab.models.logprobs.fast_path` decides which one a batch takes, and
:func:`alignlab.models.logprobs.set_fast_paths` turns them all off. Nothing outside
``alignlab.models`` imports this package (tests/test_models_interface.py checks it).
"""
