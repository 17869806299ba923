"""The preference trainer's inputs beyond per-completion log-prob sums, resolved per loss.

- per-token log-ratios (SparsePO, Christopoulou et al. 2024): the policy's per-token log-probs
  from one forward (their row sums are the sequence log-probs) and the reference's, precomputed
  once and cached like the sums; token-level losses run on the padded or packed layout;
- several references (MRPO, Le et al. 2024): ``preference.reference_models``, each precomputed
  once into its own cache file and stacked ``[B, M]`` (column 0 is the main reference);
- ties, annotator groups and scalar rewards: data columns (``data/preference_columns.py``);
- group-robust DPO's weights α (Ramesh et al. 2024): trainer state, moved by an
  exponentiated-gradient step after every micro-batch and saved for resume (:class:`GroupWeights`);
- DRO's baseline V(x) (Richemond et al. 2024): a fixed Monte-Carlo estimate from the data's
  rewards (``preference.value_baseline``, see :func:`~alignlab.data.preference_columns.attach_values`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignlab.algorithms.preference.reference import attach_reference_logps
from alignlab.core.errors import ConfigError
from alignlab.data.preference_columns import INPUT_COLUMNS
from alignlab.engine import distributed
from alignlab.losses.preference import LossSpec, update_group_weights
from alignlab.models.logprobs import completion_token_logprobs

TOKEN_FIELDS = ("chosen_token_logps", "rejected_token_logps", "ref_chosen_token_logps",
                "ref_rejected_token_logps", "chosen_mask", "rejected_mask")
MULTI_FIELDS = ("ref_chosen_logps_multi", "ref_rejected_logps_multi")
TOKEN_CACHE_FILE = "reference_token_logps.safetensors"
GROUP_WEIGHTS = "group_weights"


@dataclass(frozen=True)
class InputNeeds:
    """What the planned losses read besides the sequence log-probs."""

    tokens: bool = False
    multi: bool = False
    values: bool = False
    columns: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (data column, losses needing it)

    def column_map(self) -> dict[str, list[str]]:
        return {c: list(losses) for c, losses in self.columns}


def input_needs(specs: dict[str, LossSpec]) -> InputNeeds:
    columns: dict[str, list[str]] = {}
    for name, spec in specs.items():
        for f in spec.requires:
            if f in INPUT_COLUMNS:
                columns.setdefault(INPUT_COLUMNS[f], []).append(name)
    reads = {f for s in specs.values() for f in (*s.requires, *s.optional)}
    return InputNeeds(tokens=any(f in reads for f in TOKEN_FIELDS),
                      multi=any(f in reads for f in MULTI_FIELDS), values="values" in reads,
                      columns=tuple((c, tuple(v)) for c, v in columns.items()))


def check_references(section: Any, multi: bool, hyper_parameters: dict[str, Any],
                     per_loss: dict[str, dict[str, Any]]) -> None:
    """``preference.reference_models`` is read only by multi-reference losses, needs the
    precomputed path when it names several models, and must match ``ref_weights``."""
    refs = section.reference_models
    if refs is None:
        return
    if not multi:
        raise ConfigError("field 'preference.reference_models': no planned loss reads several "
                          "references (only mrpo does); use preference.reference instead")
    if section.reference is not None and section.reference != refs[0]:
        raise ConfigError("fields 'preference.reference' and 'preference.reference_models': the "
                          "main reference must come first in reference_models (or leave "
                          "reference unset)")
    if len(refs) > 1 and not section.precompute_reference:
        raise ConfigError("field 'preference.precompute_reference': several reference_models "
                          "are only supported precomputed; set it to true")
    for where, kwargs in [("loss_kwargs", hyper_parameters),
                          *((f"per_loss.{n}", kw) for n, kw in per_loss.items())]:
        weights = kwargs.get("ref_weights")
        if weights is not None and len(weights) != len(refs):
            raise ConfigError(f"field 'preference.{where}.ref_weights': {len(weights)} weights "
                              f"for {len(refs)} reference_models")


def attach_references(examples: list[dict[str, Any]], references: Sequence[str], *, tokens: bool,
                      load: Callable[[str], torch.nn.Module], **kwargs: Any) -> bool:
    """Precompute (or reuse from cache) ``ref_logps`` with ``references[0]``, plus
    ``ref_token_logps`` when ``tokens`` and ``ref_logps_multi`` when there are several
    references; ``kwargs`` go to :func:`attach_reference_logps`. True when all were cached."""
    main = references[0]
    if tokens:
        hit = attach_reference_logps(examples, lambda: load(main), main, field="ref_token_logps",
                                     cache_file=TOKEN_CACHE_FILE, per_token=True, **kwargs)
        for e in examples:  # the sums are the per-token values' sums: no second pass
            e["ref_logps"] = _slot_sums(e)
    else:
        hit = attach_reference_logps(examples, lambda: load(main), main, **kwargs)
    for m, path in enumerate(references[1:], 1):
        field = f"ref_logps_{m}"
        hit &= attach_reference_logps(examples, lambda p=path: load(p), path, field=field,
                                      cache_file=f"reference_logps.{m}.safetensors", **kwargs)
    if len(references) > 1:
        for e in examples:
            columns = [e["ref_logps"], *(e.pop(f"ref_logps_{m}") for m in range(1, len(references)))]
            e["ref_logps_multi"] = [list(v) for v in zip(*columns)]
    return hit


def _slot_sums(example: dict[str, Any]) -> list[float]:
    from alignlab.data.preference_batches import group_completions

    values, sums, start = example["ref_token_logps"], [], 0
    for completion in group_completions(example):
        sums.append(float(sum(values[start:start + len(completion)])))
        start += len(completion)
    return sums


def policy_logps(model: torch.nn.Module, batch: dict[str, Any], tokens: bool,
                 sequence_logps: Callable) -> tuple[Tensor, Tensor | None]:
    """``(sums [N], per-token [N, C] or None)`` from one forward of the policy."""
    if not tokens:
        return sequence_logps(model, batch), None
    per_token = completion_token_logprobs(model, batch)
    return per_token.sum(-1), per_token


def paired_extras(batch: dict[str, Any], b: int, needs: InputNeeds, ref: Tensor | None,
                  token_logps: Tensor | None, reference_model: torch.nn.Module | None
                  ) -> dict[str, Tensor]:
    """The paired PreferenceInputs fields beyond the sums: ties, groups, [B, M] references,
    per-token log-probs and masks ([:B] chosen, [B:] rejected, as the sums)."""
    out = {name: batch[name] for name in ("ties", "groups") if name in batch}
    if needs.multi and ref is not None:
        multi = batch.get("ref_logps_multi")
        multi = ref[:, None] if multi is None else multi  # one reference: the usual one
        out.update(ref_chosen_logps_multi=multi[:b], ref_rejected_logps_multi=multi[b:])
    if token_logps is not None:
        lengths = batch["completion_lengths"]
        mask = torch.arange(token_logps.shape[1], device=lengths.device)[None] < lengths[:, None]
        out.update(chosen_token_logps=token_logps[:b], rejected_token_logps=token_logps[b:],
                   chosen_mask=mask[:b], rejected_mask=mask[b:])
        ref_tokens = batch.get("ref_token_logps")
        if ref_tokens is None and reference_model is not None:
            with torch.no_grad():
                ref_tokens = completion_token_logprobs(reference_model, batch).float()
        if ref_tokens is not None:
            out.update(ref_chosen_token_logps=ref_tokens[:b], ref_rejected_token_logps=ref_tokens[b:])
    return out


class GroupWeights:
    """Group-robust DPO's α over the data's groups: uniform at first, then after every
    micro-batch α_g ∝ α_g·exp(η·L̂_g), so worse-off groups gain weight.

    L̂_g = Σ_{i∈g} loss_i / (B·p_g), with p_g the group's share of the training rows, is an
    unbiased estimate of the group's mean loss (the paper's N/N_g importance weight): without
    it a group missing from a micro-batch would lose weight for being small, not for being
    well served. Ramesh et al. 2024, "Group Robust Preference Optimization in Reward-free RLHF"."""

    def __init__(self, names: Sequence[str | int], step_size: float, shares: Sequence[float]) -> None:
        self.names, self.step_size = list(names), step_size
        self.shares = torch.tensor(list(shares), dtype=torch.float64)
        self.weights = torch.full((len(self.names),), 1.0 / len(self.names), dtype=torch.float64)
        self.synced = self.weights.clone()  # α when the processes last agreed (``sync``)

    def update(self, group_mean_losses: Tensor, groups: Tensor) -> None:
        counts = torch.bincount(groups.cpu(), minlength=len(self.names)).double()
        estimate = group_mean_losses.detach().cpu().double() * counts / (counts.sum() * self.shares)
        self.weights = update_group_weights(self.weights, estimate, self.step_size)

    def metrics(self) -> dict[str, float]:
        return {f"group_weight/{name}": float(w) for name, w in zip(self.names, self.weights)}

    def sync(self) -> None:
        """With N processes: α after every rank's updates since the last sync, the same on
        every rank. The steps α ∝ α·exp(η·L̂) commute, so this is the α one process reaches
        after the same micro-batches' updates."""
        if distributed.active():
            moved = distributed.global_sum((self.weights.log() - self.synced.log()).tolist())
            weights = self.synced * torch.tensor(moved, dtype=torch.float64).exp()
            self.weights = weights / weights.sum()
        self.synced = self.weights.clone()


__all__ = ["GROUP_WEIGHTS", "GroupWeights", "InputNeeds", "attach_references", "check_references",
           "input_needs", "paired_extras", "policy_logps"]
