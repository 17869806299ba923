"""Memory per role, worked out from a model's config: weights, gradients, optimizer states,
activations, logits and the rollout's KV cache (``docs/scaling.md`` tabulates it for 0.5B, 7B
and 70B models; ``tests/test_models_memory.py`` checks each term against a real model).

The parameter count is exact: the model is built on the ``meta`` device (no memory) and its
parameters counted, tied embeddings once. The other terms are the standard arithmetic:

- **training state** of full fine-tuning with AdamW: 16-bit weights and gradients, plus fp32
  master weights and the two moments (ZeRO paper, Rajbhandari et al. 2020: 2 + 2 + 12 bytes per
  parameter; in fp32 training, 4 + 4 + 8, no master copy);
- **activations** kept for backward, per token and decoder layer of transformers' Llama block
  (RMSNorm, attention through SDPA, which keeps no L×L score matrix, SwiGLU MLP): per norm its
  input, normalised rows, output and 1/rms (3h + 1 elements in fp32; in 16-bit the norm upcasts,
  keeping an fp32 copy of its input), q, k, v and the attention output (2·n_h·d + 2·n_kv·d),
  the MLP's gate, up, SiLU(gate) and product (4i) — the Llama form of Korthikanti et al. 2022's
  34·h bytes per token and layer, counted from the tensors autograd saves (the test sums them);
  with gradient checkpointing each layer's input (h) plus one layer's full set;
- **logits**: the fp32 [tokens, vocab] matrix a log-softmax over the whole vocabulary makes
  (alignlab's chunked log-probs bound it by the chunk instead);
- **KV cache** of the rollout: 2 (K and V) · layers · n_kv · d bytes per token per sequence.

Sharding divides what ZeRO says it divides: stage 2 the gradients and optimizer states, stage 3
(and FSDP's full sharding) the weights too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelShape:
    """What the memory terms need from a decoder-only model's config."""

    params: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of ``config`` (a transformers ``PretrainedConfig``); the parameter count
        from the model built on the meta device."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        heads = config.num_attention_heads
        return cls(params=params, hidden_size=config.hidden_size,
                   num_layers=config.num_hidden_layers, num_heads=heads,
                   num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   intermediate_size=config.intermediate_size, vocab_size=config.vocab_size)

    def lora_params(self, r: int) -> int:
        """Trainable parameters of rank-``r`` LoRA on every linear layer of every decoder block
        (PEFT's ``all-linear``): r·(d_in + d_out) per projection."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
        return r * per_layer * self.num_layers

    def activation_bytes_per_token(self, dtype_bytes: int = 2, checkpointing: bool = False) -> int:
        """Bytes kept for backward per token over all decoder layers (transformers' Llama block
        with SDPA; see the module docstring). ``dtype_bytes`` 4 (fp32) or 2 (bf16/fp16)."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q, k, v and the attention output (SDPA's saved inputs and o_proj's input); the MLP's
        # gate, up, SiLU(gate) and their product.
        matmuls = dtype_bytes * (2 * q + 2 * kv + 4 * i)
        if dtype_bytes == 4:  # each RMSNorm: its input, the normalised rows, its output, 1/rms
            norms = 2 * 4 * (3 * h + 1)
        else:  # each RMSNorm upcasts: an fp32 copy of its input, the 16-bit normalised rows,
            norms = 2 * (4 * h + 2 * h + 2 * h + 4)  # its output, and 1/rms in fp32
        layer = norms + matmuls
        if checkpointing:  # each layer's input, and one layer recomputed at a time in backward
            return dtype_bytes * h * self.num_layers + layer
        return layer * self.num_layers

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def training_state_bytes(params: int, *, mixed_precision: bool = True) -> dict[str, int]:
    """Weights, gradients and AdamW states of ``params`` trained parameters."""
    if mixed_precision:
        return {"weights": 2 * params, "gradients": 2 * params, "optimizer": 12 * params}
    return {"weights": 4 * params, "gradients": 4 * params, "optimizer": 8 * params}


@dataclass(frozen=True)
class Workload:
    """The sizes of one RL step: tokens in a training micro-batch and in the rollout batch."""

    micro_batch_tokens: int
    rollout_sequences: int
    rollout_tokens_per_sequence: int
    checkpointing: bool = True
    lora_rank: int | None = None
    shards: int = 1
    zero_stage: int = 3


def role_memory(shape: ModelShape, role: str, work: Workload) -> dict[str, int]:
    """Bytes per device of one role: ``actor`` and ``critic`` train (the critic's value head is
    one h-vector, counted in), ``reference`` and ``reward`` only run forward, ``rollout`` holds
    weights and the KV cache. 16-bit weights and activations; fp32 logits."""
    lora = work.lora_rank is not None
    weights = 2 * shape.params
    out: dict[str, int] = {}
    if role in ("actor", "critic"):
        trained = shape.lora_params(work.lora_rank) if lora else shape.params
        state = training_state_bytes(trained)
        if lora:
            state["weights"] = weights + state["weights"]  # the frozen base + the adapters
        shard_w = work.shards if work.zero_stage >= 3 else 1
        shard_go = work.shards if work.zero_stage >= 2 else 1
        out["weights"] = state["weights"] // shard_w
        out["gradients"] = state["gradients"] // shard_go
        out["optimizer"] = state["optimizer"] // shard_go
        out["activations"] = work.micro_batch_tokens * shape.activation_bytes_per_token(
            2, work.checkpointing)
        if role == "actor":  # the critic's head gives one value per token, no vocabulary
            out["logits"] = 4 * work.micro_batch_tokens * shape.vocab_size
    elif role in ("reference", "reward"):
        # With LoRA the reference is the actor's base with adapters off: no second copy.
        out["weights"] = 0 if (lora and role == "reference") else weights // work.shards
    elif role == "rollout":
        out["weights"] = weights
        out["kv_cache"] = (shape.kv_cache_bytes_per_token() * work.rollout_sequences
                           * work.rollout_tokens_per_sequence)
    else:
        raise ValueError(f"role must be actor, critic, reference, reward or rollout; got {role!r}")
    return out


__all__ = ["ModelShape", "Workload", "role_memory", "training_state_bytes"]
