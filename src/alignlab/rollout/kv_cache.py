"""The rollout's KV cache: keys and values written in place, and each prompt's read once.

Two costs of transformers' ``DynamicCache`` at GRPO shapes (n samples of long prompts):

- ``DynamicLayer`` appends each decoded token with ``torch.cat``, so every step copies the whole
  cache into a freshly allocated tensor: O(T²) bytes over a rollout, and on CPU the fresh
  allocations (tens of MB) page-fault on every step. Here every layer writes each step's keys
  and values in place into a buffer sized at the prefill (:class:`BufferLayer`), and dropping
  finished rows copies only the filled part of the rows that go on.
- After the prefill the cache is repeated ``n`` times, so each decode step reads every prompt's
  keys and values ``n`` times, though the ``n`` samples of a prompt share them. On CPU
  (:func:`rollout_cache`) :class:`PrefixSharedLayer` keeps each prompt's keys and values once
  and only the sampled tokens' per row; :class:`PrefixSharedAttention` computes a decode step's
  attention as one softmax over [prompt keys, own sampled keys], the prompt part as one matmul
  per prompt for all of its rows (the shared-prefix decomposition of Hydragen, Juravsky et al.
  2024, "Hydragen: High-Throughput LLM Inference with Shared Prefixes").

Figures: benchmarks/README.md.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignlab.core.runtime import autocast_dtype

# The prefix-shared decode pays when the repeated prompt keys it does not read (rows x prompt
# width x key width, per layer) outweigh its extra per-layer ops (reshapes by prompt, two score matmuls): measured on CPU, a
# 2-layer 64-wide model sampling 15 rows of ~20-token prompts ran 2x slower with it, the GRPO
# benchmark's 64 rows x 256 x 768 ran faster (benchmarks/README.md). Break-even ~2M keys.
MIN_SHARED_PROMPT_KEYS = 1 << 22


class BufferLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in a ``[B, heads, capacity, d]`` buffer
    (it grows, doubling, only if ``capacity`` was too small). ``keys``/``values`` are views of
    the filled part, as long as ``DynamicLayer``'s would be."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._k: Tensor | None = None
        self._v: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty(b, h, self.capacity, d)
        self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.length = 0
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def _resized(self, buf: Tensor, rows: Tensor | None, capacity: int) -> Tensor:
        """A buffer of ``capacity`` holding the filled part of ``buf`` (of ``rows`` only)."""
        filled = buf[:, :, :self.length] if rows is None else buf[rows, :, :self.length]
        out = buf.new_empty(filled.shape[0], buf.shape[1], capacity, buf.shape[-1])
        out[:, :, :self.length] = filled
        return out

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs
               ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self.capacity = max(end, 2 * self.capacity)
            self._k = self._resized(self._k, None, self.capacity)
            self._v = self._resized(self._v, None, self.capacity)
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("BufferLayer.crop takes a negative number of tokens to remove")
        if self.is_initialized and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            rows = torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats)
            self.batch_select_indices(rows)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.get_seq_length() > 0:
            self._k = self._resized(self._k, indices, self.capacity)
            self._v = self._resized(self._v, indices, self.capacity)
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)


class PrefixSharedLayer(DynamicLayer):
    """One layer's cache with each prompt's keys and values once (``[P, heads, W, d]``, from
    the prefill) and each row's sampled tokens' in a ``[B, heads, capacity, d]`` buffer.

    ``update`` returns the sampled part only; :class:`PrefixSharedAttention` adds the prompt
    part. ``owner[b]`` is the prompt of row ``b``; rows stay sorted by owner (the engine repeats
    each prompt ``n`` times in place and drops rows without reordering)."""

    def __init__(self, capacity: int, shared: "PrefixSharedAttention") -> None:
        super().__init__()
        self.capacity, self.shared = capacity, shared
        self.prefix_k: Tensor | None = None
        self.prefix_v: Tensor | None = None
        self.owner: Tensor | None = None
        self._operands: tuple[Tensor, Tensor] | None = None
        self.suffix = BufferLayer(capacity)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs
               ) -> tuple[Tensor, Tensor]:
        if self.prefix_k is None:  # the prefill: attention over the prompt as usual
            self.device = key_states.device
            self.prefix_k, self.prefix_v = key_states, value_states
            self.keys, self.values = key_states, value_states
            self.is_initialized = True
            return key_states, value_states
        if self.owner is None:
            self.set_owner(torch.arange(self.prefix_k.shape[0], device=self.device))
        if self.shared.current is not None:  # the last layer's keys went to no attention call
            raise RuntimeError("rollout: the model's attention does not go through transformers' "
                               "attention interface, so the prefix-shared decode cannot see the "
                               "prompt keys; set MIN_SHARED_PROMPT_KEYS higher to turn it off")
        k, v = self.suffix.update(key_states, value_states)
        self.keys, self.values = k, v
        self.shared.current = self
        return k, v

    def prompt_operands(self, heads: int) -> tuple[Tensor, Tensor]:
        """The prompts' keys transposed ``[P, heads, d, W]`` and values ``[P, heads, W, d]``,
        contiguous, with grouped-query heads repeated (as transformers does) and in autocast's
        dtype where it is on, made once per rollout: a matmul on the transposed (strided) keys
        copied them on every decode step (12% of the GRPO benchmark's rollout time), and under
        bf16 autocast it cast the keys (float32 out of RoPE) on every step again."""
        dtype = autocast_dtype(self.prefix_k.device) or self.prefix_k.dtype
        if self._operands is None or self._operands[1].shape[1] != heads or self._operands[0].dtype != dtype:
            pk, pv = self.prefix_k, self.prefix_v
            if pk.shape[1] != heads:
                pk = pk.repeat_interleave(heads // pk.shape[1], dim=1)
                pv = pv.repeat_interleave(heads // pv.shape[1], dim=1)
            # .to(dtype).contiguous(): .to(memory_format=...) returns a strided input unchanged
            # when its dtype already matches (the values, bf16 out of their projection)
            self._operands = (pk.transpose(-1, -2).to(dtype).contiguous(), pv.to(dtype).contiguous())
        return self._operands

    def set_owner(self, owner: Tensor) -> None:
        self.owner = owner
        counts = torch.bincount(owner, minlength=self.prefix_k.shape[0])
        self.rows_per_prompt = int(counts.max())
        self.uniform = bool((counts == self.rows_per_prompt).all())
        starts = counts.cumsum(0) - counts
        self.slot = torch.arange(owner.numel(), device=owner.device) - starts[owner]

    def get_seq_length(self) -> int:
        if self.prefix_k is None:
            return 0
        return self.prefix_k.shape[-2] + self.suffix.get_seq_length()

    def reset(self) -> None:
        self.prefix_k = self.prefix_v = self.owner = self._operands = None
        self.suffix = BufferLayer(self.capacity)
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        self.suffix.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.prefix_k is not None:
            self.set_owner(torch.arange(self.prefix_k.shape[0], device=self.device)
                           .repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.owner is None:
            self.set_owner(torch.arange(self.prefix_k.shape[0], device=self.device))
        self.set_owner(self.owner[indices])
        self.suffix.batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise RuntimeError("the rollout cache does not reorder rows (no beam search)")


ATTENTION_NAME = "alignlab_prefix_shared"
_active = threading.local()  # .mode: the PrefixSharedAttention this thread decodes under
UNSUPPORTED = ("softcap", "position_bias", "sliding_window", "s_aux")  # attention options refused


def _attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention function under :data:`ATTENTION_NAME`: a decode step on a
    :class:`PrefixSharedLayer` (the layer's ``update`` just ran) goes to
    :meth:`PrefixSharedAttention.attend`; everything else (the prefill, another thread's
    forward) to transformers' SDPA, with the mask transformers built for SDPA."""
    mode = getattr(_active, "mode", None)
    layer = mode.current if mode is not None else None
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mode.current = None
    if kwargs.get("dropout") or any(kwargs.get(k) is not None for k in UNSUPPORTED):
        raise RuntimeError("rollout decode attention: unexpected options "
                           f"{sorted(k for k in UNSUPPORTED if kwargs.get(k) is not None)}")
    b, heads, m, d = query.shape
    kv_heads = key.shape[1]
    if kv_heads != heads:  # grouped-query: a kv head's query heads as extra queries (pack_gqa)
        out = mode.attend(layer, query.reshape(b, kv_heads, heads // kv_heads * m, d), key, value,
                          kwargs.get("scaling"))
        out = out.reshape(b, heads, m, value.shape[-1])
    else:
        out = mode.attend(layer, query, key, value, kwargs.get("scaling"))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class PrefixSharedAttention:
    """Entered around a rollout's prefill and decode on a model whose layers hold
    :class:`PrefixSharedLayer` caches: the model's attention becomes :func:`_attention`, so a
    decode step computes ``softmax([q·K_prompt + mask, q·K_own] · scale) · [V_prompt; V_own]``
    with the prompt part as one matmul per prompt, and the prefill runs transformers' SDPA
    unchanged. ``prompt_keep [P, W]`` (the left-padded prompts' attention mask) is set by the
    engine after the prefill.

    Through transformers' attention interface (``config._attn_implementation``, restored on
    exit; the rollout owns the model meanwhile, and async RL samples with its own copy), not a
    ``TorchFunctionMode``: a mode intercepts every torch call of the forward in Python, which
    cost 3-5% of the GRPO benchmark's rollout."""

    def __init__(self, config) -> None:
        self.config = config
        self.current: PrefixSharedLayer | None = None
        self.bias: Tensor | None = None
        self._saved: tuple[str | None, object] | None = None

    def set_prompt_mask(self, prompt_keep: Tensor) -> None:
        """The prompts' attention mask ``[P, W]`` (left padding 0) as an additive bias."""
        self.bias = torch.zeros(prompt_keep.shape, device=prompt_keep.device).masked_fill_(
            ~prompt_keep.bool(), float("-inf"))

    def __enter__(self) -> "PrefixSharedAttention":
        self._saved = (self.config._attn_implementation, getattr(_active, "mode", None))
        self.config._attn_implementation = ATTENTION_NAME
        _active.mode = self
        return self

    def __exit__(self, *exc) -> None:
        implementation, previous = self._saved
        self.config._attn_implementation = implementation
        _active.mode = previous
        self.current = None

    def attend(self, layer: PrefixSharedLayer, q: Tensor, k: Tensor, v: Tensor,
               scale: float | None) -> Tensor:
        """``q [B, h, m, d]`` (m queries per row sharing its keys), ``k, v [B, h, t, d]`` the
        rows' own sampled keys → ``[B, h, m, d]``."""
        pk_t, pv = layer.prompt_operands(q.shape[1])
        b, heads, m, d = q.shape
        n_prompts, width = pv.shape[0], pv.shape[2]
        rows = layer.rows_per_prompt
        scale = scale if scale is not None else d ** -0.5

        def by_prompt(x: Tensor) -> Tensor:  # [B, h, m, c] → [P, h, R·m, c]
            if layer.uniform:
                x = x.reshape(n_prompts, rows, *x.shape[1:])
            else:
                x = x.new_zeros(n_prompts, rows, *x.shape[1:]).index_put_((layer.owner, layer.slot), x)
            return x.permute(0, 2, 1, 3, 4).reshape(n_prompts, heads, rows * m, x.shape[-1])

        def by_row(x: Tensor) -> Tensor:  # [P, h, R·m, c] → [B, h, m, c]
            x = x.reshape(n_prompts, heads, rows, m, x.shape[-1]).permute(0, 2, 1, 3, 4)
            return x.reshape(b, heads, m, x.shape[-1]) if layer.uniform else x[layer.owner, layer.slot]

        prompt_scores = torch.matmul(by_prompt(q), pk_t).mul_(scale)
        prompt_scores.add_(self.bias.to(prompt_scores.dtype)[:, None, None, :])
        own_scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        scores = torch.cat([by_row(prompt_scores), own_scores], dim=-1)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = by_row(torch.matmul(by_prompt(probs[..., :width].contiguous()), pv))
        return out.add_(torch.matmul(probs[..., width:], v))


def rollout_cache(config, prompt_width: int, max_new_tokens: int, device: torch.device, *,
                  rows: int = 1, n: int = 1) -> tuple[DynamicCache, PrefixSharedAttention | None]:
    """The cache of one rollout chunk (``rows`` prompts of ``prompt_width`` tokens, each to be
    sampled ``n`` times) and the attention mode to decode under (None: none).

    When every layer of ``config`` is a plain full-attention ``DynamicLayer``:
    :class:`PrefixSharedLayer` (enter the returned :class:`PrefixSharedAttention` around the
    decode) on CPU SDPA decoders when the prompts' keys are large enough to pay for the mode's
    per-op cost (:data:`MIN_SHARED_PROMPT_KEYS`), else :class:`BufferLayer` of
    ``prompt_width + max_new_tokens``. Otherwise (sliding windows, linear attention, ...)
    transformers' own layers."""
    cache = DynamicCache(config=config)
    if not (cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers)):
        return cache, None
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // max(config.num_attention_heads, 1)
    keys = rows * n * prompt_width * heads * head_dim
    if (device.type == "cpu" and n > 1 and keys >= MIN_SHARED_PROMPT_KEYS
            and getattr(config, "_attn_implementation", None) == "sdpa"):
        mode = PrefixSharedAttention(config)
        cache.layers = [PrefixSharedLayer(max_new_tokens, mode) for _ in cache.layers]
        return cache, mode
    cache.layers = [BufferLayer(prompt_width + max_new_tokens) for _ in cache.layers]
    return cache, None


__all__ = ["MIN_SHARED_PROMPT_KEYS", "BufferLayer", "PrefixSharedAttention", "PrefixSharedLayer", "rollout_cache"]
