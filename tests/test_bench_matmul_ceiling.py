"""benchmarks/matmul_ceiling.py: which layers it times, the FLOPs it counts, its last line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import matmul_ceiling  # noqa: E402


def test_every_projection_and_the_head_are_timed():
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    shapes = matmul_ceiling.projections(LlamaForCausalLM(cfg))
    per_layer = [(16, 16), (8, 16), (8, 16), (16, 16), (32, 16), (32, 16), (16, 32)]
    assert sorted(shapes) == sorted(per_layer * 2 + [(50, 16)])


def test_the_rate_counts_six_flops_a_parameter_a_token(monkeypatch):
    passes = []
    monkeypatch.setattr(matmul_ceiling, "projections_pass", lambda w, x, g, b: passes.append((x[0].shape[0], g[1].shape)))
    clock = iter([0.0, 2.0, 4.0, 4.0])  # start, after pass 1 (< 3 s), after pass 2, end
    monkeypatch.setattr(matmul_ceiling.time, "perf_counter", lambda: next(clock))
    weights = [torch.zeros(4, 5), torch.zeros(2, 3)]
    rate = matmul_ceiling.ceiling(weights, tokens=10, bf16=False, seconds=3.0)
    assert passes == [(10, (10, 2))] * 4  # two warm-up passes, two timed
    assert rate == 6 * 10 * 26 * 2 / 4.0


def test_the_benchmark_prints_a_ceiling_below_the_peak():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "matmul_ceiling.py"), "--model-size", "3m",
                           "--tokens", "256", "--seconds", "0.5", "--precision", "fp32"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = dict(x.split("=", 1) for x in proc.stdout.strip().splitlines()[-1].split())
    assert fields["tokens"] == "256"
    assert 0.0 < float(fields["ceiling_mfu"]) < 1.5
    assert abs(float(fields["ceiling_mfu"]) * float(fields["peak_gflops"])
               - float(fields["projections_gflops"])) < 0.01 * float(fields["projections_gflops"]) + 0.2
