"""One interface for log-probs and for the hidden states a value head reads.

Entry points (docs/ARCHITECTURE.md, "Log-probs"):

- :func:`token_logprobs` ``[B, T]`` and :func:`sequence_logprobs` (one value per sequence) of
  padded or packed batches;
- :func:`completion_logprobs` ``[N]`` and :func:`completion_token_logprobs` ``[N, C]`` of the
  grouped batches of :func:`alignlab.data.preference_batches.collate_groups`;
- :func:`restricted_token_logprobs` and :func:`next_token_logits` (NLPO's action mask);
- value heads: :func:`hidden_states` ``[B, T, H]``, :func:`logprobs_and_values` (a policy's
  log-probs and a head's values from one forward), :func:`state_values` (a scalar-head critic's
  ``V(s_t)``) and :func:`sequence_values` (a scalar-head model's value at each sequence's end).

Every entry point asks :func:`fast_path` which path a batch takes, and gets the same values and
gradients on each (tested):

- ``group_pass``: prefix sharing in one padding-free pass, each prompt once with all its
  completions in one row, attention in padded blocks (SDPA decoders whose positions
  come from ``position_ids``): ``shared`` batches, and flat RL batches that repeat their prompts
  when the caller asks for ``prefix_sharing`` and enough positions are skipped;
- ``two_pass``: ``shared`` batches on other decoders (the prompts with a KV cache, then the
  completions);
- ``per_sequence``: packed batches on SDPA decoders, each sequence attending in its own padded
  row instead of a dense ``[S, S]`` mask;
- ``plain``: one ordinary forward.

The speed-ups live in the private package ``alignlab.models._fast`` (with CPU attention as
matmuls and last-layer row skipping inside those passes); no module outside ``alignlab.models``
imports it. :func:`set_fast_paths` (or :func:`fast_paths_off`) turns every one of them off —
what FSDP, DeepSpeed and ``torch.compile`` need, whose wrappers and graphs the passes'
attention interception would bypass — and the first call that takes the plain path because of it
logs one line with the reason.

Why chunked (:func:`alignlab.models.backbone.chunked_logprobs`): the full-vocabulary log-softmax
of a batch is never materialised; models whose logits are post-processed go through
``model(...)`` instead (``chunked=False`` forces that; see :mod:`alignlab.models.backbone`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alignlab.core.errors import ConfigError
from alignlab.models._fast import packed_groups as _groups
from alignlab.models._fast import shared_tokens as _shared
from alignlab.models._fast import two_pass as _two
from alignlab.models.backbone import (
    backbone_kwargs,
    chunked_logprobs,
    decoder_hidden,
    find_backbone_and_head,
    find_decoder,
    scored_positions,
    sequence_end_values,
)
from alignlab.models.fast_path import (
    FastPath,
    cpu_attention_if_enabled,
    fast_path,
    fast_paths_enabled,
    fast_paths_off,
    model_parts,
    preferred_layout,
    route,
    set_fast_paths,
)

# ----------------------------------------------------------------------------------------------
# Token and sequence log-probs
# ----------------------------------------------------------------------------------------------

def _hidden(body: nn.Module, batch: dict[str, Any], path: FastPath) -> Tensor:
    if path.name == "per_sequence":
        return _groups.packed_sequences_hidden(body, batch)
    return decoder_hidden(body, batch)


def _scatter_scored(values: Tensor, scored: Tensor, shape: torch.Size) -> Tensor:
    """Row-major values of the scored positions ``[B, T-1]`` into ``[B, T]`` (0 elsewhere)."""
    out = values.new_zeros(shape)
    out[:, 1:] = out[:, 1:].masked_scatter(scored, values)
    return out


def _token_logprobs(model: nn.Module, batch: dict[str, Any], path: FastPath,
                    groups: dict[str, Tensor] | None, *, temperature: float = 1.0,
                    chunk_size: int = 4096, return_entropy: bool = False,
                    chunked: bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
    parts = find_backbone_and_head(model) if chunked is not False else None
    if chunked and parts is None:
        raise ConfigError("token_logprobs: chunked=True but this model post-processes its logits "
                          "or its output embedding could not be found; use chunked=None")
    if parts is not None and path.name == "group_pass":
        return _shared.group_token_logprobs(*parts, batch, groups, temperature=temperature,
                                            return_entropy=return_entropy)
    input_ids = batch["input_ids"]
    scored = scored_positions(batch)
    targets = input_ids[:, 1:][scored]
    if parts is not None:
        decoder, head = parts
        hidden = _hidden(decoder, batch, path)
        lp, ent = chunked_logprobs(hidden[:, :-1][scored], head.weight, head.bias, targets,
                                   temperature=temperature, chunk_size=chunk_size,
                                   with_entropy=return_entropy)
    else:
        logits = model(**backbone_kwargs(batch)).logits
        lp, ent = _full_logit_logprobs(logits[:, :-1][scored], targets, temperature, return_entropy)
    out = _scatter_scored(lp, scored, input_ids.shape)
    return (out, _scatter_scored(ent, scored, input_ids.shape)) if return_entropy else out


def token_logprobs(model: nn.Module, batch: dict[str, Any], *, temperature: float = 1.0,
                   return_entropy: bool = False, prefix_sharing: bool = False,
                   chunk_size: int = 4096, chunked: bool | None = None
                   ) -> Tensor | tuple[Tensor, Tensor]:
    """``lp[b,t] = log softmax(logits[b,t-1] / temperature)[input_ids[b,t]]`` where loss_mask is 1.

    Returns a float32 tensor shaped like ``batch["input_ids"]``, exactly 0 where ``loss_mask`` is
    0 and at t=0 (and at every packed sequence start). With ``return_entropy=True`` also returns
    the entropy of the same (temperature-scaled) next-token distribution at those positions,
    differentiable. Packed batches attend per sequence where :func:`fast_path` allows;
    ``prefix_sharing`` (``rl.prefix_sharing``) lets a flat batch whose rows repeat their prompts
    (online RL's groups) run each prompt once. ``chunked=None`` picks the chunked projection
    when it is exact for this model, ``False`` forces the full-logits ``model(...)`` forward (no
    fast path; also for FSDP/DDP-wrapped modules), ``True`` requires the chunked projection.
    """
    if temperature <= 0:
        raise ConfigError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ConfigError(f"token_logprobs: chunk_size must be >= 1, got {chunk_size}")
    if chunked is False:
        path, groups = FastPath("plain", "chunked=False: the full-logits forward"), None
    else:
        path, groups = route(model, batch, prefix_sharing)
    return _token_logprobs(model, batch, path, groups, temperature=temperature,
                           chunk_size=chunk_size, return_entropy=return_entropy, chunked=chunked)


def _full_logit_logprobs(rows: Tensor, targets: Tensor, temperature: float,
                         with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """``(log p(target), entropy or None)`` of the scored rows of a model's own full logits."""
    # The model already built the full logits; the float32 copy is kept to scored rows only.
    with torch.autocast(rows.device.type, enabled=False):
        logz = torch.log_softmax(rows.float() / temperature, dim=-1)
        lp = logz.gather(-1, targets[:, None]).squeeze(-1)
        return lp, (-(logz.exp() * logz).sum(-1) if with_entropy else None)


def restricted_token_logprobs(model: nn.Module, batch: dict[str, Any], allowed: Tensor, *,
                              temperature: float = 1.0,
                              return_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``token_logprobs`` of the policy renormalised over a per-position set of allowed tokens:
    ``lp[b,t] = z[y_t] − logsumexp_{v allowed at t} z[v]`` with ``z = logits[b,t-1] / T``.

    ``allowed`` is a bool ``[N, V]``, one row per scored position in row-major order (the rows of
    ``next_token_logits``). NLPO's action mask uses it (``algorithms/policy_gradient/nlpo.py``).
    It always takes the full-logits path: the ``[N, V]`` float32 rows of the scored positions
    are held at once.
    """
    logits, targets, scored = next_token_logits(model, batch)
    if allowed.shape != logits.shape:
        raise ConfigError(f"restricted_token_logprobs: allowed has shape {tuple(allowed.shape)}, "
                          f"the scored positions' logits {tuple(logits.shape)}")
    with torch.autocast(logits.device.type, enabled=False):
        z = (logits / temperature).masked_fill(~allowed, float("-inf"))
        logz = torch.log_softmax(z, dim=-1)
        lp = logz.gather(-1, targets[:, None]).squeeze(-1)
        ent = (-(logz.exp() * logz.masked_fill(~allowed, 0.0)).sum(-1)
               if return_entropy else None)
    out = lp.new_zeros(batch["input_ids"].shape)
    out[:, 1:] = out[:, 1:].masked_scatter(scored, lp)
    if not return_entropy:
        return out
    out_ent = ent.new_zeros(batch["input_ids"].shape)
    out_ent[:, 1:] = out_ent[:, 1:].masked_scatter(scored, ent)
    return out, out_ent


def next_token_logits(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits [N, V] float32, targets [N], scored [B, T-1])``: the untempered next-token logits
    at the ``N`` positions whose next token is scored (``loss_mask``), row-major, and those tokens."""
    scored = scored_positions(batch)
    logits = model(**backbone_kwargs(batch)).logits[:, :-1][scored].float()
    return logits, batch["input_ids"][:, 1:][scored], scored


def _sequence_ids(batch: dict[str, Any]) -> tuple[Tensor, int] | None:
    """For a packed batch: the sequence index of every token [N] and the number of sequences."""
    if batch.get("attention_mask") is not None or batch.get("seq_lens") is None:
        return None
    seq_lens = torch.as_tensor(batch["seq_lens"], device=batch["input_ids"].device).long()
    n_tokens = batch["input_ids"].numel()
    if int(seq_lens.sum()) != n_tokens:
        raise ConfigError(f"packed batch: seq_lens sum to {int(seq_lens.sum())} but the row "
                          f"has {n_tokens} tokens")
    ids = torch.repeat_interleave(torch.arange(len(seq_lens), device=seq_lens.device), seq_lens)
    return ids, len(seq_lens)


def sequence_logprobs(token_lp: Tensor, batch: dict[str, Any], reduce: str = "sum") -> Tensor:
    """One value per sequence: ``sum_t lp_t`` or ``(sum_t lp_t) / #scored tokens``.

    Padded batches give one value per row; packed batches (``attention_mask`` None and
    ``seq_lens`` given) one per entry of ``seq_lens``. A sequence with no scored token gets 0.
    """
    if reduce not in ("sum", "mean"):
        raise ConfigError(f"sequence_logprobs: reduce must be 'sum' or 'mean', got {reduce!r}")
    mask = batch["loss_mask"].to(token_lp.dtype)
    lp = token_lp * mask
    packed = _sequence_ids(batch)
    if packed is None:
        total, count = lp.sum(-1), mask.sum(-1)
    else:
        ids, n = packed
        total = lp.new_zeros(n).index_add(0, ids, lp.reshape(-1))
        count = mask.new_zeros(n).index_add(0, ids, mask.reshape(-1))
    return total if reduce == "sum" else total / count.clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Completion log-probs of grouped batches (collate_groups)
# ----------------------------------------------------------------------------------------------

_FLAT_KEYS = ("input_ids", "attention_mask", "position_ids", "loss_mask", "seq_lens")


def _flat_view(batch: dict[str, Any]) -> dict[str, Any]:
    """The ``flat``/``packed`` tensors of a grouped batch; a ``shared`` batch's completions
    joined to their prompts as right-padded rows (the ``flat`` layout's)."""
    if "prompt_ids" not in batch:
        return {k: batch.get(k) for k in _FLAT_KEYS}
    prompt_ids, owner = batch["prompt_ids"], batch["owner"]
    completion_ids = batch["completion_ids"]
    prompt_lengths = batch["prompt_lengths"][owner][:, None]
    lengths = prompt_lengths[:, 0] + batch["completion_mask"].sum(1)
    col = torch.arange(int(lengths.max()), device=prompt_ids.device)[None]
    in_prompt = col < prompt_lengths
    from_prompt = prompt_ids[owner].gather(
        1, col.clamp(max=prompt_ids.shape[1] - 1).expand(len(owner), -1))
    from_completion = completion_ids.gather(
        1, (col - prompt_lengths).clamp(0, completion_ids.shape[1] - 1))
    attention_mask = (col < lengths[:, None]).long()
    return {"input_ids": torch.where(in_prompt, from_prompt, from_completion) * attention_mask,
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
            "loss_mask": attention_mask * ~in_prompt, "seq_lens": None}


def completion_logprobs(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """``log π(y_n | x_owner(n)) = Σ_t log p(y_n,t | x, y_n,<t)``, float32 ``[N]``, for every
    completion of a ``collate_groups`` batch (layouts ``shared``, ``flat``, ``packed``).

    A ``shared`` batch keeps each prompt once (prefix sharing, Wang et al. 2024, "Accelerating
    Direct Preference Optimization with Prefix Sharing") on the path :func:`fast_path` picks."""
    path, _ = route(model, batch, prefix_sharing=False)
    device = (batch["prompt_ids"] if "prompt_ids" in batch else batch["input_ids"]).device
    # The CPU attention mode sees every torch call of the forward; enter it only where it can act.
    with cpu_attention_if_enabled(device):
        if path.name in ("group_pass", "two_pass"):
            decoder, head = find_backbone_and_head(model)
            if path.name == "group_pass":
                return _groups.group_pass_logprobs(decoder, head, batch)
            return _two.two_pass_logprobs(model, decoder, head, batch)
        view = _flat_view(batch)
        return sequence_logprobs(_token_logprobs(model, view, path, None), view)


def _spread_tokens(values: Tensor, lengths: Tensor) -> Tensor:
    """The concatenated per-completion values ``[Σ lengths]`` as ``[N, max length]`` rows."""
    width = int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(width, device=lengths.device)[None] < lengths[:, None]
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def completion_token_logprobs(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Per-token log-probs ``[N, C]`` (float32) of a ``collate_groups`` batch, for token-level
    losses: ``lp[n, t] = log π(y_n,t | x_owner(n), y_n,<t)`` for ``t < |y_n|``, 0 beyond; the
    row sums equal :func:`completion_logprobs`. A ``shared`` batch needs the one-pass form."""
    path, _ = route(model, batch, prefix_sharing=False)
    if path.name == "group_pass":
        decoder, head = find_backbone_and_head(model)
        with cpu_attention_if_enabled(batch["prompt_ids"].device):
            return _groups.group_pass_logprobs(decoder, head, batch, per_token=True)
    if path.name == "two_pass":
        raise ValueError("completion_token_logprobs reads a prefix-sharing (shared) batch only "
                         "for decoders on SDPA attention; use the flat or packed layout")
    # In the flat and packed layouts every completion token has loss_mask 1, so the scored
    # tokens, in order, are the completions' tokens in order.
    view = _flat_view(batch)
    lp = _token_logprobs(model, view, path, None)
    scored = lp[view["loss_mask"].bool()]
    lengths = batch["completion_lengths"].to(lp.device)
    if scored.numel() != int(lengths.sum()):
        raise ValueError(f"{scored.numel()} scored tokens for completions of total length "
                         f"{int(lengths.sum())}; every completion needs a non-empty prompt")
    return _spread_tokens(scored, lengths)


# ----------------------------------------------------------------------------------------------
# The hidden states a value head reads
# ----------------------------------------------------------------------------------------------

def hidden_states(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """The last hidden states ``[B, T, H]`` of ``model``'s decoder body (``model`` may be the
    body itself): what a value head reads. Packed batches attend per sequence where
    :func:`fast_path` allows."""
    path, _ = route(model, batch, prefix_sharing=False)
    body = model_parts(model)[0] or find_decoder(model) or model
    return _hidden(body, batch, path)


def logprobs_and_values(model: nn.Module, value_head: nn.Linear, batch: dict[str, Any], *,
                        temperature: float = 1.0, with_entropy: bool = False,
                        prefix_sharing: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """From one forward: ``(log π(y_t) [B,T], V(s_t) [B,T], entropy [B,T] or None)`` at the
    scored positions (0 elsewhere), as :func:`token_logprobs` and :func:`state_values` give
    them: ``V(s_t) = value_head(h_{t-1})``, read from the hidden state that predicts token t
    (a value head on the policy's own backbone, PPO's ``rl.critic: shared``)."""
    parts = find_backbone_and_head(model)
    scored = scored_positions(batch)
    if parts is None:
        # No parts to call (FSDP2 gathers weights in the root's own forward): one forward of the
        # root, its full logits and its last hidden state (after the final norm, what the
        # decoder returns), the value head on the same rows.
        out = model(**backbone_kwargs(batch), output_hidden_states=True)
        rows = out.hidden_states[-1][:, :-1][scored]
        lp, ent = _full_logit_logprobs(out.logits[:, :-1][scored],
                                       batch["input_ids"][:, 1:][scored], temperature, with_entropy)
        values = value_head(rows.float()).squeeze(-1)
        shape = batch["input_ids"].shape
        return (_scatter_scored(lp, scored, shape), _scatter_scored(values, scored, shape),
                _scatter_scored(ent, scored, shape) if with_entropy else None)
    decoder, head = parts
    path, groups = route(model, batch, prefix_sharing)
    if path.name == "group_pass":
        rows, targets = _shared.group_predictor_hidden(decoder, batch, groups)
    else:
        rows = _hidden(decoder, batch, path)[:, :-1][scored]
        targets = batch["input_ids"][:, 1:][scored]
    lp, ent = chunked_logprobs(rows, head.weight, head.bias, targets, temperature=temperature,
                               with_entropy=with_entropy)
    values = value_head(rows.float()).squeeze(-1)
    shape = batch["input_ids"].shape
    return (_scatter_scored(lp, scored, shape), _scatter_scored(values, scored, shape),
            _scatter_scored(ent, scored, shape) if with_entropy else None)


def state_values(critic: nn.Module, batch: dict[str, Any], *,
                 prefix_sharing: bool = True) -> Tensor:
    """A scalar-head critic's ``V(s_t)`` at every completion token ``t`` (``[B,T]`` float32, 0
    where ``loss_mask`` is 0), read from the hidden state at ``t − 1`` — the position whose
    logits gave ``log π(y_t)``; by prefix sharing where :func:`fast_path` takes it."""
    path, groups = route(critic, batch, prefix_sharing)
    body, head, _ = model_parts(critic)
    if path.name == "group_pass" and head is not None and head.out_features == 1:
        return _shared.group_state_values(body, head, batch, groups)
    v = critic(batch)
    out = torch.zeros_like(v)
    out[:, 1:] = v[:, :-1]
    return torch.where(batch["loss_mask"].bool(), out, torch.zeros_like(out))


def sequence_values(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """A scalar-head model's value at each sequence's last token (``[S]``, ``[S, K]`` with K
    heads): a reward model's reward. Rows that repeat their prompt (a pair's chosen and
    rejected) compute it once where :func:`fast_path` takes prefix sharing."""
    path, groups = route(model, batch, prefix_sharing=True)
    if path.name == "group_pass":
        body, head, _ = model_parts(model)
        return _shared.group_sequence_values(body, head, batch, groups)
    return sequence_end_values(model(batch), batch)


__all__ = ["FastPath", "completion_logprobs", "completion_token_logprobs",
           "fast_path", "fast_paths_enabled", "fast_paths_off", "hidden_states",
           "logprobs_and_values", "next_token_logits", "preferred_layout",
           "restricted_token_logprobs", "sequence_logprobs", "sequence_values", "set_fast_paths",
           "state_values", "token_logprobs"]
