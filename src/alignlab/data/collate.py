"""Examples → token batches: right padding, padding-free packing, and token-budget bins.

Padded batch: ``input_ids``, ``attention_mask``, ``position_ids``, ``loss_mask`` all ``[B, T]``.
Packed batch: the sequences laid end to end in one row ``[1, N]`` with ``position_ids``
restarting at 0 per sequence and ``attention_mask=None``. From those position ids
transformers (>= 5) builds a block-causal mask, so no token attends across a sequence
boundary (``find_packed_sequence_indices`` in ``transformers.masking_utils``). That only
happens when the model is called without a KV cache: pass ``use_cache=False``.

Pairwise examples (``prompt_ids`` + ``chosen_ids``/``rejected_ids``) become sequences with
:func:`join_prompt_completion`; :func:`preference_collate` puts all chosen sequences first and
all rejected ones after, so a loss splits per-sequence values with ``[:B]`` / ``[B:]``.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from alignlab.core.errors import ConfigError

_SEQUENCE_KEYS = ("input_ids", "loss_mask")


def pad_collate(examples: Sequence[dict[str, Any]], pad_token_id: int, *,
                pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Right-pad ``input_ids``/``loss_mask`` to ``[B, T]`` and add attention and positions.

    Padding positions have ``attention_mask`` 0, ``loss_mask`` 0 and ``position_ids`` 0.
    Extra keys: numbers become ``[B]`` tensors, equal-length number lists ``[B, K]`` tensors,
    anything else stays a python list.
    """
    _check_examples(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch_size = len(examples)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    position_ids = torch.zeros((batch_size, width), dtype=torch.long)
    loss_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for b, (example, n) in enumerate(zip(examples, lengths)):
        input_ids[b, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        loss_mask[b, :n] = torch.tensor(example["loss_mask"], dtype=torch.long)
        attention_mask[b, :n] = 1
        position_ids[b, :n] = torch.arange(n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "position_ids": position_ids, "loss_mask": loss_mask}
    batch.update(_collate_extras(examples))
    return batch


def completion_rows(rows: Sequence[Sequence[int]], starts: Sequence[int], pad_token_id: int
                    ) -> dict[str, Tensor]:
    """Right-padded prompt + completion rows (``rows[i]``, its completion from ``starts[i]``):
    ``input_ids``, ``attention_mask``, ``position_ids`` and ``loss_mask`` (1 on completions)
    ``[B, T]``, the layout of an online-RL rollout batch."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for i, x in enumerate(rows):
        input_ids[i, :len(x)] = torch.tensor(list(x), dtype=torch.long)
    positions = torch.arange(width)[None]
    attn = (positions < torch.tensor([len(x) for x in rows])[:, None]).long()
    loss_mask = attn * (positions >= torch.tensor(list(starts))[:, None])
    return {"input_ids": input_ids, "attention_mask": attn,
            "position_ids": (attn.cumsum(-1) - 1).clamp(min=0), "loss_mask": loss_mask}


def pack_collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate the sequences into one row ``[1, N]`` (padding-free).

    ``position_ids`` restart at 0 for each sequence, ``attention_mask`` is None, ``loss_mask``
    is 0 on each sequence's first token, ``seq_lens`` is a LongTensor ``[S]``. Extra keys are
    collated as in :func:`pad_collate` (one entry per sequence).
    """
    _check_examples(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    input_ids = torch.tensor([t for e in examples for t in e["input_ids"]], dtype=torch.long)
    loss_mask = torch.tensor([m for e in examples for m in e["loss_mask"]], dtype=torch.long)
    seq_lens = torch.tensor(lengths, dtype=torch.long)
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    position_ids = torch.arange(len(input_ids)) - torch.repeat_interleave(starts, seq_lens)
    loss_mask[starts] = 0  # no token before it in the same sequence
    batch = {"input_ids": input_ids[None], "attention_mask": None,
             "position_ids": position_ids[None], "loss_mask": loss_mask[None],
             "seq_lens": seq_lens}
    batch.update(_collate_extras(examples))
    return batch


def pack_into_bins(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into bins of at most ``max_tokens`` tokens.

    Best-fit decreasing: longest first, each into the fullest bin it fits (ties: the earliest
    bin). Deterministic; indices inside a bin are in placement order.
    """
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted
    for i in order:
        n = lengths[i]
        if n > max_tokens:
            raise ConfigError(f"sequence {i} has {n} tokens, more than max_tokens={max_tokens}; "
                              "truncate with max_length <= max_tokens")
        slot = bisect_left(free, (n, -1))
        if slot == len(free):
            bins.append([i])
            insort(free, (max_tokens - n, len(bins) - 1))
        else:
            left, b = free.pop(slot)
            bins[b].append(i)
            insort(free, (left - n, b))
    return bins


def packed_batches(examples: Sequence[dict[str, Any]], max_tokens: int
                   ) -> Iterator[dict[str, Any]]:
    """Packed micro-batches of at most ``max_tokens`` tokens each (see :func:`pack_into_bins`)."""
    for indices in pack_into_bins([len(e["input_ids"]) for e in examples], max_tokens):
        yield pack_collate([examples[i] for i in indices])


def join_prompt_completion(prompt_ids: Sequence[int], completion_ids: Sequence[int],
                           **extra: Any) -> dict[str, Any]:
    """One sequence example: loss on the completion tokens only."""
    return {"input_ids": [*prompt_ids, *completion_ids],
            "loss_mask": [0] * len(prompt_ids) + [1] * len(completion_ids), **extra}


def preference_collate(examples: Sequence[dict[str, Any]], pad_token_id: int | None = None, *,
                       packed: bool = False) -> dict[str, Any]:
    """A batch of ``2B`` sequences: the ``B`` prompt+chosen, then the ``B`` prompt+rejected.

    ``margin`` (if the examples have it) becomes a ``[B]`` tensor. Padded unless ``packed``.
    """
    chosen = [join_prompt_completion(e["prompt_ids"], e["chosen_ids"]) for e in examples]
    rejected = [join_prompt_completion(e["prompt_ids"], e["rejected_ids"]) for e in examples]
    if packed:
        batch = pack_collate(chosen + rejected)
    else:
        if pad_token_id is None:
            raise ConfigError("preference_collate needs pad_token_id unless packed=True")
        batch = pad_collate(chosen + rejected, pad_token_id)
    with_margin = sum("margin" in e for e in examples)
    if with_margin not in (0, len(examples)):
        raise ValueError(f"{with_margin} of {len(examples)} preference examples have a margin; "
                         "give every row a margin or none")
    if with_margin:
        batch["margin"] = torch.tensor([float(e["margin"]) for e in examples])
    return batch


def _check_examples(examples: Sequence[dict[str, Any]]) -> None:
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    for i, e in enumerate(examples):
        if "input_ids" not in e or "loss_mask" not in e:
            raise ValueError(f"example {i} has no input_ids/loss_mask (keys: {sorted(e)}); "
                             "pairwise examples go through join_prompt_completion first")
        if len(e["input_ids"]) != len(e["loss_mask"]) or not e["input_ids"]:
            raise ValueError(f"example {i}: input_ids and loss_mask must be non-empty and "
                             f"of equal length, got {len(e['input_ids'])} and "
                             f"{len(e['loss_mask'])}")


def _collate_extras(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in examples[0]:
        if key in _SEQUENCE_KEYS:
            continue
        missing = [i for i, e in enumerate(examples) if key not in e]
        if missing:
            raise ValueError(f"example {missing[0]} has no '{key}' but example 0 has")
        out[key] = _to_tensor([e[key] for e in examples])
    return out


def _to_tensor(values: list[Any]) -> Any:
    if all(isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.bool)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        dtype = torch.long if all(isinstance(v, int) for v in values) else torch.float32
        return torch.tensor(values, dtype=dtype)
    if all(isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                             for x in v) for v in values):
        if len({len(v) for v in values}) == 1:
            dtype = torch.long if all(isinstance(x, int) for v in values for x in v) \
                else torch.float32
            return torch.tensor(values, dtype=dtype)
    return values
