"""models/memory.py's terms against a real tiny Llama: the parameter count, LoRA's trainable
parameters (PEFT's own count), the bytes autograd saves for backward, the KV cache's bytes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from alignlab.models.memory import ModelShape, Workload, role_memory, training_state_bytes


def _config(layers: int = 2, kv_heads: int = 2, tie: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176,
                       num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                       attn_implementation="sdpa")


@pytest.mark.parametrize("tie", [False, True])
def test_the_parameter_count_is_the_real_models(tie):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(tie=tie))
    assert ModelShape.from_config(_config(tie=tie)).params == sum(
        p.numel() for p in model.parameters())


def test_lora_parameters_match_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_config(_config()),
                           LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ModelShape.from_config(_config()).lora_params(8) == trainable


def _saved_bytes_per_token(layers: int, kv_heads: int, dtype: torch.dtype,
                           checkpointing: bool = False) -> float:
    """Bytes of the (non-parameter) tensors autograd saves in one forward, per token."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(layers, kv_heads)).to(dtype).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 256, (2, 32))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(saved.values()) / ids.numel()


@pytest.mark.parametrize("dtype,kv_heads", [(torch.float32, 4), (torch.float32, 2),
                                            (torch.bfloat16, 2)])
def test_activation_bytes_are_what_autograd_saves_per_layer(dtype, kv_heads):
    measured = (_saved_bytes_per_token(2, kv_heads, dtype)
                - _saved_bytes_per_token(1, kv_heads, dtype))  # one decoder layer's share
    b = 4 if dtype == torch.float32 else 2
    per_layer = ModelShape.from_config(_config(1, kv_heads)).activation_bytes_per_token(b)
    assert measured == pytest.approx(per_layer, rel=0.01)


def test_checkpointing_keeps_only_each_layers_input():
    measured = (_saved_bytes_per_token(2, 2, torch.float32, checkpointing=True)
                - _saved_bytes_per_token(1, 2, torch.float32, checkpointing=True))
    shape2 = ModelShape.from_config(_config(2))
    shape1 = ModelShape.from_config(_config(1))
    formula = (shape2.activation_bytes_per_token(4, checkpointing=True)
               - shape1.activation_bytes_per_token(4, checkpointing=True))
    assert measured == formula == 4 * 64


def test_kv_cache_bytes_are_the_real_caches():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(2, 2)).eval()
    with torch.no_grad():
        cache = model(input_ids=torch.randint(0, 256, (3, 10)), use_cache=True).past_key_values
    nbytes = sum(t.numel() * t.element_size() for layer in cache.layers
                 for t in (layer.keys, layer.values))
    assert nbytes / 30 == ModelShape.from_config(_config(2, 2)).kv_cache_bytes_per_token(4)


def test_roles_and_sharding():
    shape = ModelShape.from_config(_config())
    p = shape.params
    assert training_state_bytes(p) == {"weights": 2 * p, "gradients": 2 * p, "optimizer": 12 * p}
    assert training_state_bytes(p, mixed_precision=False) == {
        "weights": 4 * p, "gradients": 4 * p, "optimizer": 8 * p}
    work = Workload(micro_batch_tokens=100, rollout_sequences=4, rollout_tokens_per_sequence=50,
                    checkpointing=False)
    actor = role_memory(shape, "actor", work)
    assert actor["weights"] == 2 * p and actor["optimizer"] == 12 * p
    assert actor["logits"] == 4 * 100 * 256
    assert actor["activations"] == 100 * shape.activation_bytes_per_token(2)
    assert "logits" not in role_memory(shape, "critic", work)
    z3 = role_memory(shape, "actor", Workload(100, 4, 50, shards=4, zero_stage=3))
    z2 = role_memory(shape, "actor", Workload(100, 4, 50, shards=4, zero_stage=2))
    assert z3["weights"] == 2 * p // 4 and z2["weights"] == 2 * p  # stage 2 keeps whole weights
    assert z2["optimizer"] == z3["optimizer"] == 12 * p // 4
    assert role_memory(shape, "rollout", work)["kv_cache"] == \
        shape.kv_cache_bytes_per_token() * 4 * 50
    lora = Workload(100, 4, 50, lora_rank=8)
    assert role_memory(shape, "reference", lora) == {"weights": 0}  # adapters off, no copy
    assert role_memory(shape, "reward", lora) == {"weights": 2 * p}
    assert role_memory(shape, "actor", lora)["optimizer"] == 12 * shape.lora_params(8)
    with pytest.raises(ValueError, match="role must be"):
        role_memory(shape, "judge", work)
