"""LoRA helpers (``models/adapters.py``): π_ref as the base with the adapters disabled and no
second copy of the weights, merged copies, copies sharing the frozen weights, the adapter-only
state of checkpoints, QLoRA's config error, the memory accounting."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError

from alignlab.core.config import LoraSettings, ModelSection
from alignlab.core.errors import ConfigError
from alignlab.data.preference_batches import collate_groups
from alignlab.models import adapters
from alignlab.models.adapters import (
    adapter_state_dict,
    adapters_disabled,
    copy_sharing_frozen,
    frozen_copy,
    has_adapters,
    load_adapter_state_dict,
    merged,
    quantization_kwargs,
    reference_model,
    trained_bytes,
)
from alignlab.models.heads import CausalLMWithScalarHead
from alignlab.models.loading import load_model
from alignlab.models.logprobs import completion_logprobs, token_logprobs

from tests.conftest import random_examples, random_llama

LORA = LoraSettings(r=4, alpha=8)


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    examples = random_examples(n)
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples])
    attn = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"]))
                         for e in examples])
    mask = torch.tensor([e["loss_mask"] + [0] * (width - len(e["loss_mask"])) for e in examples])
    return {"input_ids": ids, "attention_mask": attn,
            "position_ids": (attn.cumsum(-1) - 1).clamp(min=0), "loss_mask": mask}


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    random_llama(seed=1).save_pretrained(path)
    return path


def _trained_policy(path) -> torch.nn.Module:
    """A LoRA policy whose adapters have moved (B ≠ 0), so it differs from its base."""
    torch.manual_seed(0)
    policy = load_model(path, dtype="float32", lora=LORA)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return policy


def _storages(*models: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}


def test_reference_with_adapters_disabled_is_the_base_model_without_a_copy(saved_base):
    policy = _trained_policy(saved_base)
    base = load_model(saved_base, dtype="float32").eval()
    ref = adapters_disabled(policy)
    batch = _batch()
    with torch.no_grad():
        ref_lp = token_logprobs(ref, batch)
        with policy.disable_adapter():
            disabled_lp = token_logprobs(policy.eval(), batch)
        policy_lp = token_logprobs(policy, batch)
        base_lp = token_logprobs(base, batch)
    assert torch.equal(ref_lp, disabled_lp)  # exactly what peft's disable_adapter() computes
    torch.testing.assert_close(ref_lp, base_lp, atol=1e-6, rtol=0)
    assert (policy_lp - base_lp).abs().max() > 1e-2  # the adapters do change the policy
    # No second copy: every weight of the reference is one of the policy's own tensors.
    assert _storages(ref) <= _storages(policy)
    assert trained_bytes(policy, ref)["weights"] == trained_bytes(policy)["weights"]
    assert not has_adapters(ref) and not any(p.requires_grad for p in ref.parameters())
    policy.train()
    assert policy.training and not ref.training  # its own modules: the policy's mode is its own


def test_reference_follows_no_later_adapter_update_and_takes_the_fast_paths(saved_base):
    """π_ref stays the base while the adapters train; the prefix-sharing path of the
    reference's completion log-probs gives the plain path's values."""
    policy = _trained_policy(saved_base)
    ref = reference_model(policy)
    examples = [{"prompt_ids": e["input_ids"][:3], "chosen_ids": e["input_ids"][3:],
                 "rejected_ids": e["input_ids"][2:]} for e in random_examples(4)]
    shared, flat = (collate_groups(examples, 0, layout=lay) for lay in ("shared", "flat"))
    with torch.no_grad():
        before = completion_logprobs(ref, shared)
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(0.5)
        torch.testing.assert_close(completion_logprobs(ref, shared), before, atol=0, rtol=0)
        torch.testing.assert_close(completion_logprobs(ref, flat), before, atol=1e-5, rtol=1e-5)


def test_reference_of_a_full_model_is_a_frozen_copy():
    model = random_llama()
    ref = reference_model(model)
    assert not _storages(ref) & _storages(model)
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="no adapters"):
        adapters_disabled(model)


def test_merged_copy_is_peft_merge_and_leaves_the_policy_as_it_is(saved_base):
    policy = _trained_policy(saved_base)
    batch = _batch()
    with torch.no_grad():
        policy_lp = token_logprobs(policy.eval(), batch)
        merged_lp = token_logprobs(merged(policy).eval(), batch)
        peft_lp = token_logprobs(copy.deepcopy(policy).merge_and_unload().eval(), batch)
        after_lp = token_logprobs(policy, batch)
    assert torch.equal(merged_lp, peft_lp)
    torch.testing.assert_close(merged_lp, policy_lp, atol=1e-4, rtol=0)
    assert torch.equal(after_lp, policy_lp) and has_adapters(policy)


def test_copies_share_the_frozen_weights_and_copy_the_adapters(saved_base):
    policy = _trained_policy(saved_base)
    critic_body = copy_sharing_frozen(policy)
    adapters_of = {n for n, p in policy.named_parameters() if p.requires_grad}
    by_name = dict(critic_body.named_parameters())
    for name, p in policy.named_parameters():
        same = p.untyped_storage().data_ptr() == by_name[name].untyped_storage().data_ptr()
        assert same == (name not in adapters_of), name
        assert by_name[name].requires_grad == p.requires_grad
    snapshot = frozen_copy(policy)
    assert not any(p.requires_grad for p in snapshot.parameters()) and not snapshot.training
    assert all(p.requires_grad for n, p in policy.named_parameters() if n in adapters_of)
    # A copy of a full model shares nothing (every weight trains).
    full = random_llama()
    assert not _storages(copy_sharing_frozen(full)) & _storages(full)


def test_adapter_state_dict_keeps_adapters_and_trained_heads_and_loads_back(saved_base):
    policy = _trained_policy(saved_base)
    critic = CausalLMWithScalarHead(copy_sharing_frozen(policy))
    state = adapter_state_dict(critic)
    assert state and all("lora_" in k or k.startswith("head.") for k in state)
    assert {"head.weight", "head.bias"} <= set(state)
    snapshot = frozen_copy(policy)  # frozen adapters are still the state to keep
    assert set(adapter_state_dict(snapshot)) == {k for k in policy.state_dict() if "lora_" in k}
    other = CausalLMWithScalarHead(copy_sharing_frozen(_trained_policy(saved_base)))
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.zero_()
    load_adapter_state_dict(other, state)
    for k, v in adapter_state_dict(other).items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ConfigError, match="missing"):
        load_adapter_state_dict(other, {k: v for k, v in state.items() if k != "head.bias"})
    full = random_llama()
    assert adapter_state_dict(full).keys() == full.state_dict().keys()


def test_trained_bytes_counts_each_storage_once():
    model = random_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # parameters() yields the tied output embedding once; buffers: the rotary frequencies.
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    one = trained_bytes(model)
    assert one["weights"] == weights
    trainable = sum(p.numel() * 4 for p in model.parameters())
    assert one["gradients"] == trainable and one["optimizer"] == 2 * trainable
    assert one["total"] == weights + 3 * trainable
    two = trained_bytes(model, copy.deepcopy(model).requires_grad_(False))
    assert two["weights"] == 2 * weights and two["gradients"] == trainable


def test_qlora_without_bitsandbytes_or_a_gpu_is_a_config_error_naming_the_field(saved_base):
    lora = LoraSettings(r=4, quantize="4bit")
    with pytest.raises(ConfigError, match=r"field 'model\.lora\.quantize': '4bit' \(QLoRA\)"):
        load_model(saved_base, lora=lora)
    with pytest.raises(ConfigError, match="model.lora.quantize"):
        CausalLMWithScalarHead.from_causal_lm(saved_base, lora=lora)
    assert quantization_kwargs(LoraSettings(), torch.float32) == {}
    with pytest.raises(ValidationError, match="quantize"):
        ModelSection(lora={"quantize": "2bit"})


def test_qlora_kwargs_when_bitsandbytes_and_a_gpu_are_there(monkeypatch):
    """The loading keywords QLoRA would use (the GPU path itself needs bitsandbytes + CUDA)."""
    pytest.importorskip("transformers")
    real = adapters.importlib.util.find_spec
    monkeypatch.setattr(adapters.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    try:
        four = quantization_kwargs(LoraSettings(quantize="4bit"), torch.bfloat16)
        eight = quantization_kwargs(LoraSettings(quantize="8bit"), torch.bfloat16)
    except Exception as err:  # transformers checks the bitsandbytes version it cannot find
        pytest.skip(f"BitsAndBytesConfig needs bitsandbytes installed: {err}")
    q = four["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and four["device_map"] == {"": 0}
    assert eight["quantization_config"].load_in_8bit


def test_scalar_head_model_with_lora_saves_merged_and_adapter_layouts(saved_base, tmp_path):
    torch.manual_seed(0)
    model = CausalLMWithScalarHead.from_causal_lm(saved_base, lora=LORA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()  # the merged classifier
    adapter = tmp_path / "adapter"
    assert {f.name for f in adapter.iterdir()} >= {
        "adapter_config.json", "adapter_model.safetensors", "scalar_head.json",
        "scalar_head.safetensors"}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str(saved_base)
    batch = _batch()
    with torch.no_grad():
        want = model.eval().sequence_values(batch)
        for path in (tmp_path, adapter):
            got = CausalLMWithScalarHead.from_pretrained(path).eval().sequence_values(batch)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert has_adapters(model)  # saving merged a copy
