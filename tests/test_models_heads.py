"""Scalar heads: per-token values, sequence-end indexing, save/load, reward-model loading."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignlab.core.errors import ConfigError
from alignlab.models.backbone import sequence_end_index
from alignlab.models.heads import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    CausalLMWithScalarHead,
    load_reward_model,
)

VOCAB = 80


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=32, **extra)


def batches():
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 8, 3)]
    width = max(map(len, seqs))
    ids = torch.zeros(3, width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], attn[i, :len(s)] = torch.tensor(s), 1
    padded = {"input_ids": ids, "attention_mask": attn,
              "position_ids": (attn.cumsum(-1) - 1).clamp(min=0), "loss_mask": attn.clone()}
    packed = {"input_ids": torch.tensor([sum(seqs, [])]), "attention_mask": None,
              "position_ids": torch.tensor([[i for s in seqs for i in range(len(s))]]),
              "loss_mask": torch.ones(1, sum(map(len, seqs)), dtype=torch.long),
              "seq_lens": [len(s) for s in seqs]}
    return seqs, padded, packed


@pytest.fixture()
def value_model():
    torch.manual_seed(0)
    return CausalLMWithScalarHead(LlamaForCausalLM(tiny_config()).float())


def test_sequence_end_index_padded_and_packed():
    _, padded, packed = batches()
    row, col = sequence_end_index(padded)
    assert row.tolist() == [0, 1, 2] and col.tolist() == [4, 7, 2]
    row, col = sequence_end_index(packed)
    assert row.tolist() == [0, 0, 0] and col.tolist() == [4, 12, 15]
    with pytest.raises(ConfigError, match="seq_lens"):
        sequence_end_index({**packed, "seq_lens": [5, 8, 2]})


def test_forward_shapes_and_packed_equals_padded(value_model):
    seqs, padded, packed = batches()
    values = value_model(padded)
    assert values.shape == padded["input_ids"].shape and values.dtype == torch.float32
    assert not hasattr(value_model.backbone, "lm_head")  # the output embedding is dropped
    v_pad = value_model.sequence_values(padded)
    v_pack = value_model.sequence_values(packed)
    assert v_pad.shape == (3,)
    torch.testing.assert_close(v_pad, v_pack, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_pad, torch.stack([values[i, len(s) - 1]
                                                   for i, s in enumerate(seqs)]))
    v_pad.sum().backward()
    assert value_model.head.weight.grad is not None
    assert value_model.backbone.embed_tokens.weight.grad is not None


def test_ensemble_heads():
    torch.manual_seed(0)
    model = CausalLMWithScalarHead(LlamaForCausalLM(tiny_config()), num_heads=4)
    _, padded, packed = batches()
    assert model(padded).shape == (*padded["input_ids"].shape, 4)
    assert model.sequence_values(packed).shape == (3, 4)


def test_save_load_round_trip(value_model, tmp_path):
    _, padded, packed = batches()
    value_model.eval()
    with torch.no_grad():
        expected = value_model(padded)
    value_model.save_pretrained(tmp_path)
    assert not (tmp_path / HEAD_WEIGHTS).is_file() and not (tmp_path / HEAD_CONFIG).is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    restored = CausalLMWithScalarHead.from_pretrained(tmp_path, dtype="float32").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(padded), expected, atol=0, rtol=0)
    reward = load_reward_model(tmp_path, dtype="float32")
    assert not any(p.requires_grad for p in reward.parameters())
    with torch.no_grad():
        torch.testing.assert_close(reward.sequence_values(packed),
                                   value_model.sequence_values(packed), atol=1e-5, rtol=1e-5)


def test_from_causal_lm_checkpoint(tmp_path):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_config()).float()
    lm.save_pretrained(tmp_path)
    model = CausalLMWithScalarHead.from_causal_lm(tmp_path, dtype="float32", num_heads=2)
    torch.testing.assert_close(model.backbone.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert model.head.out_features == 2 and model.training


def test_sequence_classification_checkpoint_as_reward_model(tmp_path):
    torch.manual_seed(0)
    classifier = LlamaForSequenceClassification(tiny_config(num_labels=1, pad_token_id=0))
    classifier.float().eval()
    classifier.save_pretrained(tmp_path)
    _, padded, packed = batches()
    with torch.no_grad():
        expected = classifier(input_ids=padded["input_ids"],
                              attention_mask=padded["attention_mask"]).logits.squeeze(-1)
    reward = load_reward_model(tmp_path, dtype="float32")
    assert isinstance(reward, CausalLMWithScalarHead) and not reward.training
    with torch.no_grad():
        torch.testing.assert_close(reward.sequence_values(padded), expected,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reward.sequence_values(packed), expected,
                                   atol=1e-5, rtol=1e-5)


def test_reward_model_rejects_other_checkpoints(tmp_path):
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "lm")
    with pytest.raises(ConfigError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")
    LlamaForSequenceClassification(tiny_config(num_labels=3, pad_token_id=0)).save_pretrained(
        tmp_path / "cls3")
    with pytest.raises(ConfigError, match="num_labels=3"):
        load_reward_model(tmp_path / "cls3")
    with pytest.raises(ConfigError, match="not a local directory"):
        load_reward_model(tmp_path / "missing")


# ---- portable reward models (issue 15): the standard sequence-classification layout ------------

def _tiny_lms():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    return {"llama": LlamaForCausalLM(tiny_config(pad_token_id=0)),
            "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                               n_positions=32)),
            "qwen2": Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32,
                                                  intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2))}


@pytest.mark.parametrize("num_heads,bias", [(1, False), (3, False), (1, True), (2, True)])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_saved_reward_model_loads_with_auto_sequence_classification(arch, num_heads, bias, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = CausalLMWithScalarHead(_tiny_lms()[arch].float(), num_heads, bias=bias).eval()
    if bias:
        with torch.no_grad():
            model.head.bias.copy_(torch.linspace(-0.7, 0.3, num_heads))
    _, padded, packed = batches()
    with torch.no_grad():
        expected = model.sequence_values(padded)
    model.save_pretrained(tmp_path, pad_token_id=0)
    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert classifier.config.num_labels == num_heads and classifier.config.pad_token_id == 0
    with torch.no_grad():
        logits = classifier.eval()(input_ids=padded["input_ids"],
                                   attention_mask=padded["attention_mask"]).logits
    shift = model.head.bias.detach() if bias else torch.zeros(num_heads)
    # HF's score has no bias: the same scores, each head shifted by its (stored) bias.
    torch.testing.assert_close(logits, expected.view(3, num_heads) - shift, atol=1e-5, rtol=1e-5)
    restored = load_reward_model(tmp_path, dtype="float32")
    assert restored.num_heads == num_heads and (restored.head.bias is not None) == bias
    with torch.no_grad():
        torch.testing.assert_close(restored.sequence_values(padded), expected, atol=0, rtol=0)
        torch.testing.assert_close(restored.sequence_values(packed), expected, atol=1e-5, rtol=1e-5)


def test_old_scalar_head_layout_still_loads(value_model, tmp_path):
    """Directories written before the sequence-classification layout: backbone + scalar_head.*."""
    from safetensors.torch import save_file

    _, padded, _ = batches()
    value_model.eval()
    with torch.no_grad():
        value_model.head.bias.fill_(0.25)
        expected = value_model.sequence_values(padded)
    value_model.backbone.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in value_model.head.state_dict().items()},
              str(tmp_path / HEAD_WEIGHTS))
    (tmp_path / HEAD_CONFIG).write_text('{"format": "alignlab.scalar_head", "version": 1, '
                                        '"num_heads": 1, "hidden_size": 32, "bias": true}')
    reward = load_reward_model(tmp_path, dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(reward.sequence_values(padded), expected, atol=0, rtol=0)
