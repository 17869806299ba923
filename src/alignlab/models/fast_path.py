"""Which path a batch takes through the log-prob interface (``models/logprobs.py``), and the one
switch that turns every fast path off.

:func:`fast_path` decides per batch (``group_pass``, ``two_pass``, ``per_sequence`` or
``plain``, with the reason) and :func:`preferred_layout` makes the same decision before grouped
batches are collated. :func:`set_fast_paths` / :func:`fast_paths_off` turn every fast path off —
what FSDP, DeepSpeed and ``torch.compile`` need, whose wrappers and graphs the passes' attention
interception would bypass — and the first call that takes the plain path because of it logs one
line with the reason. The passes themselves live in the private ``alignlab.models._fast``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from alignlab.core.errors import ConfigError
from alignlab.models._fast import cpu_attention as _cpu
from alignlab.models._fast import shared_tokens as _shared
from alignlab.models.backbone import find_backbone_and_head, find_decoder

log = logging.getLogger(__name__)

# Sharing the prompts of a flat batch pays for its fixed per-pass cost (grouping, scatter and
# gather per layer) only when it skips enough token positions (repeated prompts and padding):
# small arithmetic micro-batches ran slower shared, the GRPO benchmark's ran faster
# (benchmarks/README.md).
MIN_SKIPPED_TOKENS = 512


# ----------------------------------------------------------------------------------------------
# The switch
# ----------------------------------------------------------------------------------------------

_SWITCH = {"enabled": True, "reason": ""}
_LOGGED: set[str] = set()


def set_fast_paths(enabled: bool, reason: str = "") -> None:
    """Turn every fast path on or off for this process; off needs a ``reason`` (logged once, at
    the first call that takes the plain path because of it)."""
    if not enabled and not reason:
        raise ConfigError("set_fast_paths(False, reason): say why the fast paths are off")
    _SWITCH.update(enabled=bool(enabled), reason="" if enabled else reason)


def fast_paths_enabled() -> bool:
    """Whether the fast paths may be taken (see :func:`set_fast_paths`)."""
    return bool(_SWITCH["enabled"])


@contextlib.contextmanager
def fast_paths_off(reason: str) -> Iterator[None]:
    """Inside, every entry point takes the plain path (as :func:`set_fast_paths`)."""
    before = dict(_SWITCH)
    set_fast_paths(False, reason)
    try:
        yield
    finally:
        _SWITCH.update(before)


def _switched_off() -> FastPath:
    reason = str(_SWITCH["reason"])
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        log.warning("alignlab: fast log-prob paths are off (%s); every log-prob and value entry "
                    "point takes the plain path", reason)
    return FastPath("plain", f"fast paths are off: {reason}")


def cpu_attention_if_enabled(device: torch.device) -> contextlib.AbstractContextManager:
    return _cpu.cpu_attention(device) if fast_paths_enabled() else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# The decision
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FastPath:
    """The path a batch takes through the log-prob interface, and why."""

    name: str  # "group_pass" | "two_pass" | "per_sequence" | "plain"
    reason: str


def model_parts(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None, str]:
    """``(body, head, why not)``: a causal LM's decoder and plain output embedding, a scalar-head
    model's backbone and head, or a bare decoder body and no head."""
    found = find_backbone_and_head(model)
    if found is not None:
        return found[0], found[1], ""
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if isinstance(backbone, nn.Module) and isinstance(head, nn.Linear):
        return backbone, head, ""
    if find_decoder(model) is None and hasattr(model, "config"):
        return model, None, ""
    return None, None, "its logits are post-processed or its output embedding is wrapped"


@functools.lru_cache(maxsize=None)
def _takes_position_ids(cls: type) -> bool:
    """Per decoder class, once: the check runs on every forward."""
    return "position_ids" in inspect.signature(cls.forward).parameters


def _attends_in_groups(decoder: nn.Module) -> bool:
    """Whether the decoder's attention calls SDPA (which the group pass intercepts) and its
    positions come from ``position_ids`` (not, as with ALiBi models, from the mask)."""
    return (getattr(getattr(decoder, "config", None), "_attn_implementation", None) == "sdpa"
            and _takes_position_ids(type(decoder)))


def _sharing_blocker(*modules: nn.Module) -> str:
    """Why a shared pass would not be exact for these modules, or "": it needs full causal
    attention (a sliding window or chunked attention would see padded slots as distance) and
    no recurrent state."""
    for module in modules:
        cfg = getattr(module, "config", None)
        cfg = getattr(cfg, "text_config", None) or cfg
        if getattr(cfg, "is_encoder_decoder", False):
            return "it is an encoder-decoder"
        for field in ("sliding_window", "attention_chunk_size"):
            if getattr(cfg, field, None) and getattr(cfg, "use_sliding_window", True):
                return f"it uses {field}={getattr(cfg, field)}"
        if getattr(module, "_is_stateful", False):
            return "it is a stateful (recurrent) model"
    return ""


def _shared_path(model: nn.Module) -> FastPath:
    """The path of a ``shared`` batch (prompts and completions apart) for ``model``."""
    body, head, why = model_parts(model)
    if head is None:
        return FastPath("plain", why or "it has no output head")
    blocker = _sharing_blocker(model, body)
    if blocker:
        return FastPath("plain", f"prefix sharing is not exact for this model: {blocker}")
    if _attends_in_groups(body):
        return FastPath("group_pass", "SDPA attention with positions from position_ids: each "
                                      "prompt and its completions in one padding-free pass")
    return FastPath("two_pass", "attention is not SDPA (or positions do not come from "
                                "position_ids): the prompts once with a KV cache, then the "
                                "completions")


def _is_packed(batch: dict[str, Any]) -> bool:
    return (batch.get("attention_mask") is None and batch.get("seq_lens") is not None
            and batch.get("position_ids") is not None and batch["input_ids"].shape[0] == 1)


def _packed_path(model: nn.Module, batch: dict[str, Any]) -> FastPath:
    body, _, why = model_parts(model)
    if body is None:
        return FastPath("plain", why)
    lengths = torch.as_tensor(batch["seq_lens"])
    if not (lengths.numel() and int(lengths.sum()) == batch["input_ids"].shape[1]):
        return FastPath("plain", "its seq_lens do not cover the packed row")
    blocker = "" if _attends_in_groups(body) else "attention is not SDPA"
    blocker = blocker or _sharing_blocker(body)
    if blocker:
        return FastPath("plain", f"{blocker}: transformers' block-causal mask from position_ids")
    return FastPath("per_sequence", "SDPA attention: each packed sequence attends in its own "
                                    "padded row, not through a dense [S, S] mask")


def _flat_path(model: nn.Module, batch: dict[str, Any], prefix_sharing: bool
               ) -> tuple[FastPath, dict[str, Tensor] | None]:
    if not prefix_sharing:
        return FastPath("plain", "a padded batch, prefix sharing not asked for"), None
    shared = _shared_path(model)
    if shared.name == "plain":
        return shared, None
    if shared.name != "group_pass":
        return FastPath("plain", "flat batches share prompts only in one pass, on SDPA "
                                 "attention with positions from position_ids"), None
    groups = _shared.as_groups(batch)
    if groups is None:
        return FastPath("plain", "its rows are not prompt + completion, right-padded, with the "
                                 "loss on the completion"), None
    skipped = _shared.skipped_positions(batch, groups)
    if skipped < MIN_SKIPPED_TOKENS:
        return FastPath("plain", f"sharing would skip only {skipped} positions (< "
                                 f"{MIN_SKIPPED_TOKENS}), too few to pay for the pass"), None
    return FastPath("group_pass", f"each distinct prompt once, {skipped} repeated or padded "
                                  "positions skipped"), groups


def route(model: nn.Module, batch: dict[str, Any], prefix_sharing: bool
           ) -> tuple[FastPath, dict[str, Tensor] | None]:
    """:func:`fast_path` and, for a flat batch taking the group pass, its groups."""
    if not fast_paths_enabled():
        return _switched_off(), None
    if "prompt_ids" in batch:
        return _shared_path(model), None
    if _is_packed(batch):
        return _packed_path(model, batch), None
    return _flat_path(model, batch, prefix_sharing)


def fast_path(model: nn.Module, batch: dict[str, Any], *, prefix_sharing: bool = False) -> FastPath:
    """The path the entry points take for ``batch`` on ``model``, and the reason.

    ``model``: a causal LM, a scalar-head model (``CausalLMWithScalarHead``) or a bare decoder
    body. ``shared`` batches (``collate_groups(layout="shared")``) take ``group_pass`` or
    ``two_pass``; packed batches ``per_sequence``; a flat padded batch takes ``group_pass`` only
    with ``prefix_sharing`` (the ``rl.prefix_sharing`` of a caller) when its rows repeat their
    prompts enough to skip :data:`MIN_SKIPPED_TOKENS` positions; anything else, and everything
    while :func:`set_fast_paths` has them off, ``plain``."""
    return route(model, batch, prefix_sharing)[0]


def preferred_layout(model: nn.Module, *, per_token: bool = False,
                     checkpointing: bool = False) -> tuple[str, str]:
    """``("shared", why)`` when grouped batches for ``model`` should keep each prompt once
    (a ``shared`` batch takes a fast path), else ``("flat", why not)``: the same decision as
    :func:`fast_path`, made before the batches are collated.

    ``per_token``: token-level losses read per-token log-probs, which only the one-pass form
    gives; ``checkpointing``: the two-pass form needs the KV cache, which activation
    checkpointing turns off."""
    path = _switched_off() if not fast_paths_enabled() else _shared_path(model)
    if path.name == "plain":
        return "flat", path.reason
    if path.name == "two_pass" and per_token:
        return "flat", "token-level losses share prefixes only on SDPA attention"
    if path.name == "two_pass" and checkpointing:
        return "flat", ("off SDPA attention it needs the KV cache, which "
                        "train.gradient_checkpointing turns off")
    return "shared", path.reason


__all__ = ["FastPath", "MIN_SKIPPED_TOKENS", "cpu_attention_if_enabled", "fast_path",
           "fast_paths_enabled", "fast_paths_off", "model_parts", "preferred_layout", "route",
           "set_fast_paths"]
