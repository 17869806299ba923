"""Resumable micro-batch streams: a shuffled pass per epoch, positioned by (epoch, index).

With N processes every rank walks the same stream and collates its own contiguous share of
each micro-batch (``shard``), so the position, and a checkpoint of it, is the same on all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from alignlab.core.config import DataSection, TrainSection
from alignlab.data.collate import pack_collate, pad_collate


class EpochBatches:
    """Yield micro-batches forever, reshuffling each epoch from ``seed + epoch``.

    The position is two integers, so a resumed run skips straight to the next micro-batch
    without touching the data it already consumed.
    """

    def __init__(self, examples: Sequence[Any], batch_size: int,
                 collate: Callable[[list[Any]], dict[str, Any]], *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        if not examples:
            raise ValueError("no training examples: the data source produced zero rows")
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.seed, self.shuffle = seed, shuffle
        n = len(examples)
        self.batches_per_epoch = n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)
        self.epoch, self.index = 0, 0
        self.part = slice(None)  # this process's share of each micro-batch (``shard``)

    def shard(self, part: slice) -> None:
        """Collate only ``ids[part]`` of each micro-batch's ``batch_size`` examples (the
        engine gives each of N processes a contiguous ``batch_size / N``)."""
        self.part = part

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            order = self._order(self.epoch)
            while self.index < self.batches_per_epoch:
                ids = order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
                ids = ids[self.part]
                self.index += 1
                yield self.collate([self.examples[i] for i in ids])
            self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def make_batches(examples: list[dict[str, Any]], pad_token_id: int, data: DataSection,
                 train_cfg: TrainSection) -> EpochBatches:
    """Micro-batches of ``train.batch_size`` examples, padded or packed padding-free."""
    collate = pack_collate if data.packing else (lambda ex: pad_collate(ex, pad_token_id))
    return EpochBatches(examples, train_cfg.batch_size, collate, seed=train_cfg.seed)
