"""The decoder body and output embedding of a causal LM, and the chunked log-softmax over them.

The low-level pieces every log-prob path is built from (see :mod:`alignlab.models.logprobs`
for the entry points): find the body and the head such that ``logits = head(body(...))``,
project hidden states to log-probs ``chunk_size`` rows at a time, and the plain decoder call.

Why chunked: the full-vocabulary float32 log-softmax of a batch is ``B*T*V*4`` bytes (8 x 4096
tokens x 150k vocab = 20 GB) and autograd would keep it for backward. The log-prob paths run the
backbone only, keep the hidden states of the positions that predict a scored token (prompt and
padding rows are never projected), and apply the output embedding ``chunk_size`` rows at a time
inside ``_ChunkedLogProb``, which saves only those hidden rows and recomputes each chunk's
logits in backward. Peak extra memory is two ``chunk_size x V`` float32 blocks.

Why a fallback: the chunked path assumes ``logits = hidden @ W.T (+ b)``. Models that
post-process logits (Gemma-2 soft-capping, Cohere ``logit_scale``, Granite ``logits_scaling``,
...), LoRA on the output embedding, prompt-learning PEFT methods, and wrappers whose output
embedding cannot be found make :func:`find_backbone_and_head` return None; callers then go
through ``model(...)``, which gives the same numbers with the full logits tensor in memory.
So does a model sharded by FSDP2, whose weights are gathered in its modules' own forwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alignlab.core.errors import ConfigError

# Config fields that mean the model transforms ``hidden @ W.T`` before the softmax.
_LOGIT_POSTPROCESSING_FIELDS = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
    "lm_head_multiplier", "scale_width", "dim_model_base", "mup_width_multiplier",
)
_LOGIT_POSTPROCESSING_MODULE_ATTRS = ("final_logits_bias", "logit_scale", "softcap")


# ----------------------------------------------------------------------------------------------
# Finding the backbone and output embedding
# ----------------------------------------------------------------------------------------------

def _unwrap_peft(model: nn.Module) -> tuple[nn.Module, bool]:
    """The underlying transformers model of a PEFT wrapper; flag True if PEFT changes forward."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return model, False
    if isinstance(model, PeftModel):
        prompt_learning = bool(getattr(model.active_peft_config, "is_prompt_learning", False))
        return model.get_base_model(), prompt_learning
    return model, False


def _has_logit_postprocessing(lm: nn.Module) -> bool:
    configs = [getattr(lm, "config", None)]
    text_config = getattr(configs[0], "text_config", None)
    if text_config is not None:
        configs.append(text_config)
    for cfg in configs:
        for field in _LOGIT_POSTPROCESSING_FIELDS:
            value = getattr(cfg, field, None)
            if value is not None and value is not False:
                return True
    return any(getattr(lm, a, None) is not None for a in _LOGIT_POSTPROCESSING_MODULE_ATTRS)


def _is_fsdp(model: nn.Module) -> bool:
    """FSDP2 (``fully_shard``) or DeepSpeed ZeRO-3: the root's weights (embeddings, the tied
    output embedding) are gathered in the root's forward, which calling the decoder and the head
    apart bypasses."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    if isinstance(model, FSDPModule):
        return True
    # DeepSpeed ZeRO-3 gathers in each module's forward too; it converts every weight of the
    # module it partitions (each carries ds_id), so the first one tells (called per log-prob)
    return hasattr(next(model.parameters(), None), "ds_id")


def find_decoder(model: nn.Module) -> nn.Module | None:
    """The transformer body of a causal LM (PEFT wrappers unwrapped; LoRA layers stay inside).

    ``get_decoder()`` first (transformers 5 resolves it through ``base_model``), else the
    attribute named by ``base_model_prefix``. None if neither gives a module other than ``model``.
    """
    lm, _ = _unwrap_peft(model)
    decoder = None
    get_decoder = getattr(lm, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
    if decoder is None or decoder is lm:
        decoder = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if not isinstance(decoder, nn.Module) or decoder is lm:
        return None
    return decoder


def find_backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, output_embedding)`` such that ``logits = head(decoder(...).last_hidden_state)``.

    Works for plain transformers causal LMs and LoRA-wrapped PEFT models. Returns None when that
    identity cannot be trusted (logit post-processing, a wrapped output embedding, prompt-learning
    PEFT); callers then use ``model(...)``.
    """
    lm, peft_changes_forward = _unwrap_peft(model)
    if peft_changes_forward or _has_logit_postprocessing(lm) or _is_fsdp(model):
        return None
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    # Exactly nn.Linear: a LoRA / modules_to_save wrapper has a .weight that is not the whole map.
    if type(head) is not nn.Linear:
        return None
    decoder = find_decoder(lm)
    return None if decoder is None else (decoder, head)


# ----------------------------------------------------------------------------------------------
# The chunked projection + log-softmax
# ----------------------------------------------------------------------------------------------

def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """``(h @ W.T + b) / temperature`` in float32 (matmul in ``weight``'s compute dtype)."""
    logits = (h.to(weight.dtype) @ weight.t()).float()  # a fresh buffer: in-place is safe
    if bias is not None:
        logits.add_(bias.float())
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


class _ChunkedLogProb(torch.autograd.Function):
    """``logp_i = z_i[y_i] - logsumexp(z_i)``, ``H_i = logsumexp(z_i) - sum_v p_iv z_iv`` with
    ``z = (h W^T + b) / T``, computed ``chunk_size`` rows at a time.

    Backward recomputes each chunk's logits: ``dz = g_lp (onehot - p) - g_H p (z - E_p[z])``,
    ``grad_h = (dz/T) W``, ``grad_W = (dz/T)^T h``, ``grad_b = sum_rows dz/T``.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                temperature: float, chunk_size: int, with_entropy: bool) -> tuple[Tensor, Tensor]:
        dtype = _compute_dtype(hidden, weight)
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_zeros(n if with_entropy else 0, dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                z = _chunk_logits(hidden[rows], w, bias, temperature)
                lse = torch.logsumexp(z, dim=-1)
                logp[rows] = z.gather(-1, targets[rows, None]).squeeze(-1) - lse
                if with_entropy:
                    entropy[rows] = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.chunk_size, ctx.dtype = temperature, chunk_size, dtype
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor | None, grad_entropy: Tensor | None):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        temperature, chunk_size, dtype = ctx.temperature, ctx.chunk_size, ctx.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        f32 = torch.float32
        grad_w = torch.zeros(weight.shape, dtype=f32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=f32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h = hidden[rows]
                z = _chunk_logits(h, w, bias, temperature)
                p = torch.softmax(z, dim=-1)
                # In place, so at most two chunk x V buffers (z and p) are alive at once.
                if grad_entropy is not None and grad_entropy.numel():
                    expected_z = (p * z).sum(-1, keepdim=True)
                    z.sub_(expected_z).mul_(p).mul_(-grad_entropy[rows].float()[:, None])
                    ent_dz = z
                else:
                    ent_dz = None
                del z
                if grad_logp is not None:
                    g = grad_logp[rows].float()[:, None]
                    dz = p.mul_(-g).scatter_add_(-1, targets[rows, None], g)
                    if ent_dz is not None:
                        dz.add_(ent_dz)
                else:
                    dz = ent_dz if ent_dz is not None else p.zero_()
                del ent_dz
                if temperature != 1.0:
                    dz.div_(temperature)
                dz_c = dz.to(dtype)
                if need_h:
                    grad_h[rows] = (dz_c @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (dz_c.t() @ h.to(dtype)).float()
                if need_b:
                    grad_b += dz.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None)


def chunked_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                     temperature: float = 1.0, chunk_size: int = 4096,
                     with_entropy: bool = False) -> tuple[Tensor, Tensor]:
    """``(log p(targets), entropy)`` per row of ``hidden [N,H]`` under ``softmax((hW^T+b)/T)``.

    The entropy tensor is empty unless ``with_entropy`` (it costs one extra softmax per chunk).
    """
    return _ChunkedLogProb.apply(hidden, weight, bias, targets, float(temperature),
                                 int(chunk_size), bool(with_entropy))


# ----------------------------------------------------------------------------------------------
# Batch geometry and the plain decoder call
# ----------------------------------------------------------------------------------------------

def scored_positions(batch: dict[str, Any]) -> Tensor:
    """Bool [B,T-1]: position t-1 predicts a scored token t (loss_mask[t]=1, t has context)."""
    input_ids = batch["input_ids"]
    loss_mask = batch.get("loss_mask")
    if loss_mask is None:
        raise ConfigError("token_logprobs: the batch has no 'loss_mask'; the collator must set it")
    if loss_mask.shape != input_ids.shape:
        raise ConfigError(f"token_logprobs: loss_mask shape {tuple(loss_mask.shape)} != "
                          f"input_ids shape {tuple(input_ids.shape)}")
    scored = loss_mask[:, 1:].bool()
    position_ids = batch.get("position_ids")
    if position_ids is not None and batch.get("attention_mask") is None:
        # In a packed row a token at position 0 starts a new sequence: it has no context.
        scored = scored & (position_ids[:, 1:] != 0)
    return scored


def backbone_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a plain forward of ``batch`` (no KV cache)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
            "position_ids": batch.get("position_ids"), "use_cache": False}


def decoder_hidden(decoder: nn.Module, batch: dict[str, Any]) -> Tensor:
    """The decoder's last hidden states ``[B, T, H]`` from one plain forward (a packed batch
    attends through transformers' block-causal mask built from ``position_ids``)."""
    return decoder(**backbone_kwargs(batch)).last_hidden_state


def sequence_end_index(batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``(row, col)`` of each sequence's last token.

    Padded: the rightmost position with ``attention_mask`` 1 in each row. Packed
    (``attention_mask`` None, ``seq_lens`` given): ``cumsum(seq_lens) - 1`` in row 0.
    Neither: the last column of each row.
    """
    input_ids = batch["input_ids"]
    device = input_ids.device
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        positions = torch.arange(input_ids.shape[1], device=device)
        col = (positions * attention_mask.bool().long()).argmax(-1)
        return torch.arange(input_ids.shape[0], device=device), col
    if batch.get("seq_lens") is not None:
        if input_ids.shape[0] != 1:
            raise ConfigError(f"packed batch must have one row, got {input_ids.shape[0]}")
        ends = torch.as_tensor(batch["seq_lens"], device=device).long().cumsum(0) - 1
        if len(ends) and int(ends[-1]) != input_ids.shape[1] - 1:
            raise ConfigError(f"packed batch: seq_lens sum to {int(ends[-1]) + 1} but the row "
                              f"has {input_ids.shape[1]} tokens")
        return torch.zeros_like(ends), ends
    rows = torch.arange(input_ids.shape[0], device=device)
    return rows, torch.full_like(rows, input_ids.shape[1] - 1)


def sequence_end_values(values: Tensor, batch: dict[str, Any]) -> Tensor:
    """``values [B,T(,K)]`` at each sequence's last token → ``[S(,K)]``."""
    row, col = sequence_end_index(batch)
    return values[row, col]


__all__ = ["backbone_kwargs", "chunked_logprobs", "decoder_hidden", "find_backbone_and_head",
           "find_decoder", "scored_positions", "sequence_end_index", "sequence_end_values"]
