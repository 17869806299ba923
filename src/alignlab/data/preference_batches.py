"""Preference examples as *groups*: one prompt and the completions scored against it.

Every preference loss kind reads log-probs of completions that share a prompt: a pair
(chosen, rejected), one labelled completion (+ KTO's mismatched completion for the KL
reference point), or a ranked list of K completions. :func:`group_completions` lists them in
*slot* order; :func:`collate_groups` lays a micro-batch out slot-major (all slot-0 completions,
then all slot-1, ...), so a paired batch splits with ``[:B]`` / ``[B:]`` as in
``preference_collate``. Two layouts:

- ``shared``: prompts once ``[B, P]`` + completions ``[N, C]`` (+ ``owner [N]``) for
  prompt-prefix sharing (:func:`alignlab.models.logprobs.completion_logprobs`);
- ``flat``/``packed``: each completion joined to its prompt, padded ``[N, T]`` or packed
  ``[1, ΣT]`` (the plain path through ``token_logprobs``).

"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from alignlab.core.errors import ConfigError
from alignlab.data.collate import join_prompt_completion, pack_collate, pad_collate
from alignlab.data.preference_columns import add_column_fields

KIND_FORMATS = {"paired": "preference", "unpaired": "unpaired", "listwise": "ranked"}
KL_KEY = "kl_completion_ids"
PAD_MULTIPLE = 16
COMPLETION_PAD_MULTIPLE = 4


def group_completions(example: dict[str, Any]) -> list[list[int]]:
    """The completions of one tokenised example, in slot order."""
    if "chosen_ids" in example:
        return [example["chosen_ids"], example["rejected_ids"]]
    comps = example["completion_ids"]
    if comps and isinstance(comps[0], list):  # ranked
        return list(comps)
    return [comps] + ([example[KL_KEY]] if KL_KEY in example else [])


def add_kl_completions(examples: list[dict[str, Any]], seed: int) -> None:
    """Give each unpaired example a *mismatched* completion (another example's) for KTO's
    reference point z₀ = KL(π‖ref), estimated on (x_i, y_j≠i) as in the KTO paper and TRL.

    The partner is fixed per example (a shifted random order), so its reference log-prob can be
    precomputed once like the others."""
    if len(examples) < 2:
        raise ConfigError("data: KTO's KL reference point needs at least 2 unpaired rows")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for i, j in zip(order, order[1:] + order[:1]):
        examples[i][KL_KEY] = list(examples[j]["completion_ids"])


def collate_groups(examples: Sequence[dict[str, Any]], pad_token_id: int, *, layout: str = "shared"
                   ) -> dict[str, Any]:
    """A micro-batch of ``B`` groups with ``N`` completions in total (slot-major order).

    Always: ``owner [N]`` (the group of each completion), ``slot [N]``, ``completion_lengths
    [N]``, ``num_groups``; ``ref_logps [N]`` if the examples carry ``ref_logps``; ``labels``,
    ``margin``, ``scores [B, K]`` when present. Layout-specific tensors: see the module doc.
    """
    if layout not in ("shared", "flat", "packed"):
        raise ValueError(f"unknown layout {layout!r}")
    groups = [group_completions(e) for e in examples]
    k_max = max(len(g) for g in groups)
    owner, slot, comps, refs = [], [], [], []
    has_ref = "ref_logps" in examples[0]
    for k in range(k_max):
        for b, g in enumerate(groups):
            if k < len(g):
                owner.append(b)
                slot.append(k)
                comps.append(g[k])
                if has_ref:
                    refs.append(float(examples[b]["ref_logps"][k]))
    batch: dict[str, Any] = {
        "owner": torch.tensor(owner), "slot": torch.tensor(slot),
        "completion_lengths": torch.tensor([len(c) for c in comps]),
        "num_groups": len(examples)}
    if has_ref:
        batch["ref_logps"] = torch.tensor(refs, dtype=torch.float32)
    if layout == "shared":
        prompts = [{"input_ids": e["prompt_ids"], "loss_mask": [0] * len(e["prompt_ids"])}
                   for e in examples]
        p = pad_collate(prompts, pad_token_id, pad_to_multiple_of=PAD_MULTIPLE)
        c = pad_collate([{"input_ids": x, "loss_mask": [1] * len(x)} for x in comps], pad_token_id,
                        pad_to_multiple_of=COMPLETION_PAD_MULTIPLE)
        batch.update(prompt_ids=p["input_ids"], prompt_lengths=p["attention_mask"].sum(1),
                     completion_ids=c["input_ids"], completion_mask=c["attention_mask"])
    else:
        seqs = [join_prompt_completion(examples[b]["prompt_ids"], x) for b, x in zip(owner, comps)]
        flat = pack_collate(seqs) if layout == "packed" else pad_collate(seqs, pad_token_id)
        batch.update({k: flat[k] for k in ("input_ids", "attention_mask", "position_ids",
                                           "loss_mask")})
        if layout == "packed":
            batch["seq_lens"] = flat["seq_lens"]
    _add_row_fields(batch, examples, k_max)
    return batch


def _add_row_fields(batch: dict[str, Any], examples: Sequence[dict[str, Any]], k_max: int) -> None:
    first = examples[0]
    if all("label" in e for e in examples):  # reward-only (DRO) rows may leave it out
        batch["labels"] = torch.tensor([bool(e["label"]) for e in examples])
    if "margin" in first:
        batch["margin"] = torch.tensor([float(e["margin"]) for e in examples])
    if "scores" in first:
        scores = torch.zeros(len(examples), k_max)
        for b, e in enumerate(examples):
            scores[b, :len(e["scores"])] = torch.tensor(e["scores"], dtype=torch.float32)
        batch["scores"] = scores
    add_column_fields(batch, examples)
