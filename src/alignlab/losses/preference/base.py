"""Shared machinery of the preference losses: inputs, result, spec and the registry.

Conventions every loss follows (TRL's DPOTrainer conventions where they overlap):

- log-probs are sequence sums of per-token log-probs (``sequence_logprobs(reduce="sum")``);
  length-normalised losses divide by ``*_lengths`` themselves;
- log-ratios ``a = π_c − ref_c`` and ``b = π_r − ref_r``; the DPO logit is ``β·(a − b)``;
- implicit rewards are ``β·(π − ref)`` (reference-free losses: ``β·π`` or ``β·π/|y|``) and are
  returned detached; they are for logging, the loss never back-propagates through them;
- ``losses`` has one entry per example (per pair, per list, per unpaired completion); the
  trainer sums them and divides by the number of items.

A loss is one function decorated with ``@preference_loss(name, kind=..., requires=...)``; the
decorator checks that the fields the loss needs are present before calling it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlab.core.errors import ConfigError
from alignlab.core.registry import Registry

Kind = Literal["paired", "unpaired", "listwise"]


@dataclass
class PreferenceInputs:
    """Everything a preference loss may read. Every field is optional; each loss declares the
    ones it needs. Shapes: B examples, T tokens, M reference models, K list items."""

    # paired: one chosen and one rejected completion per prompt, log-prob sums [B]
    chosen_logps: Tensor | None = None
    rejected_logps: Tensor | None = None
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None  # completion token counts [B]
    rejected_lengths: Tensor | None = None
    margin: Tensor | None = None  # score(chosen) − score(rejected) [B], graded feedback
    ties: Tensor | None = None  # bool [B], the annotator could not tell the two apart
    groups: Tensor | None = None  # long [B], annotator group of each pair
    # several reference models (MRPO): [B, M]
    ref_chosen_logps_multi: Tensor | None = None
    ref_rejected_logps_multi: Tensor | None = None
    # per-token values [B, T] for token-weighted losses; masks are 1 on completion tokens
    chosen_token_logps: Tensor | None = None
    rejected_token_logps: Tensor | None = None
    ref_chosen_token_logps: Tensor | None = None
    ref_rejected_token_logps: Tensor | None = None
    chosen_mask: Tensor | None = None
    rejected_mask: Tensor | None = None
    chosen_token_weights: Tensor | None = None
    rejected_token_weights: Tensor | None = None
    # unpaired: one completion with a binary (or scalar) label per example [B]
    logps: Tensor | None = None
    ref_logps: Tensor | None = None
    labels: Tensor | None = None  # bool [B], True = desirable
    kl_ref: Tensor | float | None = None  # KTO's reference point z0 (scalar)
    rewards: Tensor | None = None  # scalar feedback per completion [B] (DRO)
    values: Tensor | None = None  # baseline V(x) per prompt [B] (DRO)
    # listwise: K ranked or scored completions per prompt [B, K]
    list_logps: Tensor | None = None
    ref_list_logps: Tensor | None = None
    scores: Tensor | None = None  # higher is better
    list_lengths: Tensor | None = None  # token counts [B, K]
    list_mask: Tensor | None = None  # bool [B, K], False on padding items of short lists

    def present(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@dataclass
class LossResult:
    """Per-example losses plus detached implicit rewards and scalar metrics.

    For unpaired losses ``chosen_rewards``/``rejected_rewards`` are the rewards of the
    desirable/undesirable examples (so their sizes add up to B)."""

    losses: Tensor
    chosen_rewards: Tensor | None = None
    rejected_rewards: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """What the registry knows about a loss besides its function."""

    name: str
    kind: Kind
    needs_reference: bool
    requires: tuple[str, ...]
    optional: tuple[str, ...]
    defaults: dict[str, Any]
    fn: Callable[..., LossResult]


class MissingInputError(ConfigError, ValueError):
    """A loss was called without a field it needs (names the loss and the field)."""


PREFERENCE_LOSSES: Registry = Registry("preference loss")
_FIELDS = {f.name for f in dataclasses.fields(PreferenceInputs)}


def preference_loss(name: str, *aliases: str, kind: Kind, requires: tuple[str, ...],
                    optional: tuple[str, ...] = ()) -> Callable:
    """Register ``fn(inputs, *, **hyper_parameters) -> LossResult`` under ``name``.

    ``needs_reference`` is derived: a loss needs a reference model iff it requires a ``ref_*``
    field, so the spec cannot drift from the code."""

    unknown = [f for f in (*requires, *optional) if f not in _FIELDS]
    if unknown:
        raise ValueError(f"preference loss {name!r} declares unknown input fields {unknown}")

    def decorator(fn: Callable[..., LossResult]) -> Callable[..., LossResult]:
        @functools.wraps(fn)
        def checked(inputs: PreferenceInputs, **kwargs: Any) -> LossResult:
            check_inputs(checked.spec, inputs)
            return fn(inputs, **kwargs)

        checked.spec = LossSpec(  # type: ignore[attr-defined]
            name=name, kind=kind,
            needs_reference=any(f.startswith("ref_") for f in requires),
            requires=tuple(requires), optional=tuple(optional),
            defaults=_keyword_defaults(fn), fn=checked)
        PREFERENCE_LOSSES.register(name, *aliases)(checked)
        return checked

    return decorator


def _keyword_defaults(fn: Callable) -> dict[str, Any]:
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY}


def loss_spec(name: str) -> LossSpec:
    return PREFERENCE_LOSSES.get(name).spec  # type: ignore[attr-defined]


def check_inputs(spec: LossSpec, inputs: PreferenceInputs) -> None:
    missing = [f for f in spec.requires if getattr(inputs, f) is None]
    if missing:
        hint = (" (it compares against a reference model; compute the reference log-probs or "
                "pick a reference-free loss such as simpo or orpo)"
                if any(f.startswith("ref_") for f in missing) else "")
        raise MissingInputError(
            f"preference loss {spec.name!r} needs input field(s) {', '.join(missing)}, "
            f"which are None{hint}; given: {', '.join(inputs.present()) or 'nothing'}")
    for name, want in _SHAPE_CHECKED.items():
        value = getattr(inputs, name)
        if name in spec.requires and isinstance(value, Tensor) and value.dim() != want:
            raise MissingInputError(
                f"preference loss {spec.name!r} ({spec.kind}) expects {name} with {want} "
                f"dimension(s), got shape {tuple(value.shape)}")


_SHAPE_CHECKED = {"chosen_logps": 1, "logps": 1, "list_logps": 2}


# ---- helpers shared by the loss families ----------------------------------------------------

def logratios(inputs: PreferenceInputs) -> tuple[Tensor, Tensor]:
    """``(π_c − ref_c, π_r − ref_r)``."""
    return (inputs.chosen_logps - inputs.ref_chosen_logps,
            inputs.rejected_logps - inputs.ref_rejected_logps)


def mean_logps(logps: Tensor, lengths: Tensor) -> Tensor:
    """Per-token average log-prob; lengths of 0 (empty completions) count as 1."""
    return logps / lengths.to(logps.dtype).clamp(min=1)


def smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """``−(1−ε)·log σ(z) − ε·log σ(−z)``: the BCE of z against the soft label 1−ε."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = losses * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses


def paired_result(losses: Tensor, chosen_rewards: Tensor | None, rejected_rewards: Tensor | None,
                  **metrics: Tensor) -> LossResult:
    """Wrap per-pair losses with TRL's reward metrics (rewards/chosen, /margins, /accuracies)."""
    out: dict[str, Tensor] = {k: torch.as_tensor(v).detach() for k, v in metrics.items()}
    if chosen_rewards is not None and rejected_rewards is not None:
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        out["rewards/chosen"] = chosen_rewards.mean()
        out["rewards/rejected"] = rejected_rewards.mean()
        out["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
        out["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean()
    return LossResult(losses, chosen_rewards, rejected_rewards, out)


def implicit_rewards(inputs: PreferenceInputs, beta: float) -> tuple[Tensor, Tensor]:
    a, b = logratios(inputs)
    return beta * a.detach(), beta * b.detach()
