"""benchmarks/mfu_bound.py: what each stand-in computes, which variant runs which way, its last line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _assets  # noqa: E402
import mfu_bound  # noqa: E402


@pytest.fixture
def llama(monkeypatch):
    """A tiny grouped-query Llama; the classes' forwards are restored after the test."""
    for cls in (modeling_llama.LlamaAttention, modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP):
        monkeypatch.setattr(cls, "forward", cls.forward)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def test_no_attention_keeps_the_four_projections_and_nothing_else(llama):
    attn, norm = llama.model.layers[0].self_attn, llama.model.layers[0].input_layernorm
    x = torch.randn(1, 5, 16)
    norm.weight.data.fill_(2.0)
    mfu_bound.ablate("no_attention")
    out, weights = attn(x, position_embeddings=None, attention_mask=None)
    k, v = attn.k_proj(x), attn.v_proj(x)  # 8 wide: two kv heads of 4, each serving two heads
    expected = attn.o_proj(attn.q_proj(x) + (k + v).repeat_interleave(2, dim=-1))
    assert weights is None and torch.equal(out, expected)
    assert not torch.equal(norm(x), x)  # norms untouched by this variant
    out.sum().backward()
    assert all(p.grad is not None for p in attn.parameters())  # every projection trains


def test_matmuls_only_drops_norms_and_the_swiglu(llama):
    layer = llama.model.layers[0]
    x = torch.randn(1, 5, 16)
    mfu_bound.ablate("matmuls_only")
    assert torch.equal(layer.input_layernorm(x), x)
    mlp = layer.mlp
    assert torch.equal(mlp(x), mlp.down_proj(mlp.gate_proj(x) + mlp.up_proj(x)))
    assert llama(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 50)  # the whole model still runs


def test_real_patches_nothing(llama):
    before = modeling_llama.LlamaAttention.forward, modeling_llama.LlamaRMSNorm.forward
    mfu_bound.ablate("real")
    assert (modeling_llama.LlamaAttention.forward, modeling_llama.LlamaRMSNorm.forward) == before


def test_main_runs_each_variant_and_reports_mfu_against_the_peak(monkeypatch, capsys):
    calls = []

    def fake_run(script, args, variant, folder, skip=()):
        calls.append((variant, args.checkpointing))
        rate = {"real": 100e9, "no_attention": 150e9, "matmuls_only": 180e9}[variant]
        return {"flops_per_s": rate, "seconds": 2 * 8e11 / rate, "reference_seconds": 1.0, "bf16": True,
                "peak_flops": 150e9}  # below the parent's 200: the highest is taken

    monkeypatch.setattr(mfu_bound, "run_variant", fake_run)
    monkeypatch.setattr(mfu_bound.dpo_vs_trl, "build_assets", lambda folder, args: None)
    monkeypatch.setattr(_assets, "matmul_peak", lambda bf16: 200e9 if bf16 else 1.0)
    monkeypatch.setattr(sys, "argv", ["mfu_bound.py", "--steps", "2", "--checkpointing", "none"])
    mfu_bound.main()
    assert calls == [("real", "none"), ("no_attention", "none"), ("matmuls_only", "none")]
    fields = dict(x.split("=", 1) for x in capsys.readouterr().out.strip().splitlines()[-1].split())
    assert fields == {"mfu": "0.500", "mfu_no_attention": "0.750", "mfu_matmuls_only": "0.900",
                      "peak_gflops": "200.0", "checkpointing": "none", "real_s": "8.000",
                      "attention_share": "0.333", "norms_swiglu_share": "0.111",
                      "no_attention_s": "5.333", "matmuls_only_s": "4.444"}


def test_each_checkpointing_maps_to_a_dpo_benchmark_variant():
    for variant in mfu_bound.CHECKPOINTING.values():
        assert variant in mfu_bound.dpo_vs_trl.CHECKPOINTING
    assert mfu_bound.dpo_vs_trl.CHECKPOINTING[mfu_bound.CHECKPOINTING["selective"]] == "selective"
    assert mfu_bound.dpo_vs_trl.CHECKPOINTING[mfu_bound.CHECKPOINTING["none"]] is False


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mfu_bound.py"), "--quick",
                           "--precision", "fp32"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = dict(x.split("=", 1) for x in proc.stdout.strip().splitlines()[-1].split())
    assert 0 < float(fields["mfu"]) < 1.5 and fields["checkpointing"] == "selective"
    assert float(fields["real_s"]) > 0 and float(fields["matmuls_only_s"]) > 0

