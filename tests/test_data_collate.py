"""Padding, packing, token-budget bins; packed logits equal padded logits."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignlab.core.errors import ConfigError
from alignlab.data.collate import (
    join_prompt_completion,
    pack_collate,
    pack_into_bins,
    packed_batches,
    pad_collate,
    preference_collate,
)

EXAMPLES = [
    {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1], "label": True, "margin": 0.5},
    {"input_ids": [8], "loss_mask": [1], "label": False, "margin": 1.0},
    {"input_ids": [9, 10, 11, 12, 13], "loss_mask": [1, 0, 1, 1, 1], "label": True,
     "margin": 2.0},
]


def test_pad_collate_shapes_and_positions():
    batch = pad_collate(EXAMPLES, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [9, 10, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 0, 1, 1, 1]]
    assert batch["label"].dtype == torch.bool and batch["label"].tolist() == [True, False, True]
    assert batch["margin"].dtype == torch.float32
    assert pad_collate(EXAMPLES, 0, pad_to_multiple_of=4)["input_ids"].shape == (3, 8)


def test_pack_collate_restarts_positions_and_masks_first_tokens():
    batch = pack_collate(EXAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 4]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 0, 0, 1, 1, 1]]
    assert batch["attention_mask"] is None
    assert batch["seq_lens"].dtype == torch.long and batch["seq_lens"].tolist() == [3, 1, 5]
    assert batch["margin"].tolist() == [0.5, 1.0, 2.0]


def test_collate_rejects_pairwise_examples():
    with pytest.raises(ValueError, match="join_prompt_completion"):
        pad_collate([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}], 0)


def test_preference_collate_puts_chosen_before_rejected():
    examples = [{"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5], "margin": 1.0},
                {"prompt_ids": [1], "chosen_ids": [6], "rejected_ids": [7, 8, 9], "margin": 0.0}]
    batch = preference_collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 6, 0, 0], [1, 2, 5, 0],
                                           [1, 7, 8, 9]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0],
                                           [0, 1, 1, 1]]
    assert batch["margin"].tolist() == [1.0, 0.0]
    packed = preference_collate(examples, packed=True)
    assert packed["seq_lens"].tolist() == [4, 2, 3, 4]
    assert join_prompt_completion([1], [2, 3], label=True)["loss_mask"] == [0, 1, 1]


def test_pack_into_bins_bounds_and_determinism():
    lengths = [5, 3, 8, 2, 7, 1, 4, 6]
    bins = pack_into_bins(lengths, max_tokens=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 36 tokens need at least 4 bins of 10
    assert bins == pack_into_bins(lengths, max_tokens=10)
    with pytest.raises(ConfigError, match="more than max_tokens"):
        pack_into_bins([11], max_tokens=10)
    batches = list(packed_batches(EXAMPLES, max_tokens=6))
    assert [b["input_ids"].shape[1] for b in batches] == [6, 3]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_padded_logits(attn):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation=attn)
    model = LlamaForCausalLM(config).eval()
    lengths = [7, 3, 11, 1, 5]
    examples = [{"input_ids": torch.randint(1, 100, (n,)).tolist(), "loss_mask": [1] * n}
                for n in lengths]
    padded, packed = pad_collate(examples, pad_token_id=0), pack_collate(examples)
    with torch.no_grad():
        padded_logits = model(input_ids=padded["input_ids"],
                              attention_mask=padded["attention_mask"],
                              position_ids=padded["position_ids"], use_cache=False).logits
        packed_logits = model(input_ids=packed["input_ids"], attention_mask=None,
                              position_ids=packed["position_ids"], use_cache=False).logits
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(packed_logits[0], padded_logits[real], atol=1e-5, rtol=0)
