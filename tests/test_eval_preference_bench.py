"""``eval.preference_bench.benchmark_steps`` (the DPO benchmark's alignlab side): it trains,
counts the unshared tokens it consumed, and ``gradient_checkpointing`` recomputes the layers
without changing the update."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignlab.eval.preference_bench import benchmark_steps

ROWS = [{"prompt_ids": [1, 2, 3, 4 + i], "chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]}
        for i in range(4)]


def _run(checkpointing: bool | str, quantization: str = "none") -> tuple[LlamaForCausalLM, dict, dict]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, max_position_embeddings=64,
                                         pad_token_id=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = benchmark_steps(model, SimpleNamespace(pad_token_id=0), [dict(r) for r in ROWS],
                            steps=2, batch_size=2, precision="fp32", device="cpu", lr=1e-2,
                            gradient_checkpointing=checkpointing,
                            reference_quantization=quantization)
    return model, before, stats


def test_benchmark_steps_trains_counts_and_checkpoints_without_changing_the_update():
    plain, before, stats = _run(False)
    ckpt, _, ckpt_stats = _run(True)
    selective, _, _ = _run("selective")
    assert not plain.is_activation_checkpointing and ckpt.is_activation_checkpointing
    assert selective.is_activation_checkpointing
    assert len(stats["step_seconds"]) == 2 and stats["pairs"] == 4.0
    assert stats["tokens"] == 4 * (2 * 4 + 3 + 2)  # the prompt counted twice, unshared
    moved = max(float((v - before[k]).abs().max()) for k, v in plain.state_dict().items())
    assert moved > 1e-3  # it trained
    for key, value in ckpt.state_dict().items():
        assert torch.allclose(value, plain.state_dict()[key], atol=1e-6), key
        assert torch.allclose(selective.state_dict()[key], plain.state_dict()[key], atol=1e-6), key
    # an int8 reference: the same steps from slightly different reference log-probs
    int8, _, _ = _run(False, "int8")
    gaps = [float((v - plain.state_dict()[k]).abs().max()) for k, v in int8.state_dict().items()]
    assert 0 < max(gaps) < 0.1 * moved, (max(gaps), moved)
    assert ckpt_stats["tokens"] == stats["tokens"]


def test_benchmark_steps_writes_no_checkpoint_as_the_trl_side_saves_none(monkeypatch):
    from alignlab.engine import run

    saved = []
    monkeypatch.setattr(run, "save_checkpoint", lambda *a, **k: saved.append(a))
    _run(False)
    assert saved == []  # a 20-step timing would otherwise include writing the weights and Adam's state
