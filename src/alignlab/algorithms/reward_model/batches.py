"""Token batches of reward-model data (pairs, ranked lists, scored rows) and the per-example
view of the model's per-sequence rewards."""

from __future__ import annotations

from typing import Any

import torch

from alignlab.data.collate import (
    join_prompt_completion,
    pack_collate,
    pad_collate,
    preference_collate,
)


def collate(examples: list[dict], fmt: str, pad_token_id: int, packed: bool = False,
            columns: list[int] | None = None) -> dict[str, Any]:
    """A token batch for ``fmt``; ``member_mask [B, len(columns)]`` when ``columns`` is given.

    ``preference``: 2B sequences, chosen then rejected (+ ``margin``). ``ranked``: every item of
    every list, row-major, with ``scores``/``item_mask`` ``[B, L]``. ``prompt_completion``: one
    sequence per row with ``target [B]``.
    """
    def sequences(seqs: list[dict]) -> dict[str, Any]:
        return pack_collate(seqs) if packed else pad_collate(seqs, pad_token_id)

    if fmt == "preference":
        batch = preference_collate(examples, pad_token_id, packed=packed)
    elif fmt == "ranked":
        batch = sequences([join_prompt_completion(e["prompt_ids"], c)
                           for e in examples for c in e["completion_ids"]])
        width = max(len(e["completion_ids"]) for e in examples)
        batch["scores"] = torch.zeros(len(examples), width)
        batch["item_mask"] = torch.zeros(len(examples), width, dtype=torch.bool)
        for b, e in enumerate(examples):
            batch["scores"][b, :len(e["scores"])] = torch.tensor(e["scores"])
            batch["item_mask"][b, :len(e["scores"])] = True
    else:
        batch = sequences([{"input_ids": e["input_ids"], "loss_mask": e["loss_mask"]} for e in examples])
        batch["target"] = torch.tensor([e["target"] for e in examples])
    if columns is not None:
        batch["member_mask"] = torch.tensor([[e["member_mask"][c] for c in columns] for e in examples])
    return batch


def example_rewards(rewards: torch.Tensor, batch: dict[str, Any], fmt: str) -> torch.Tensor:
    """Per-sequence rewards ``[S, H]`` → per-example items ``[B, L, H]`` (pair: L = 2, chosen first)."""
    if fmt == "preference":
        half = rewards.shape[0] // 2
        return torch.stack([rewards[:half], rewards[half:]], dim=1)
    if fmt == "ranked":
        mask = batch["item_mask"]
        items = rewards.new_zeros(*mask.shape, rewards.shape[-1])
        items[mask] = rewards
        return items
    return rewards[:, None]
