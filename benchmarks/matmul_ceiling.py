"""The MFU a model's projections reach alone: the ceiling of what a training step can show.

    python benchmarks/matmul_ceiling.py [--model-size 44m --tokens 3000 --precision auto --seconds 30]

Builds the benchmarks' random-init Llama (``--model-size``, as ``dpo_vs_trl.py``), then times
every ``nn.Linear`` of it, forward and backward (input and weight gradients), on ``--tokens``
packed tokens at the training precision (bf16 autocast over fp32 weights, as the trainers run it,
or fp32), with nothing else: no attention, norm, activation, optimizer or loss. Its FLOP rate
against the square-matmul peak (``_assets.matmul_peak``) is the MFU a step would show if every
other op were free; the MFU the DPO and GRPO benchmarks print can only come near it. Last line:
``ceiling_mfu=X projections_gflops=Y peak_gflops=Z tokens=T``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _assets import MODEL_SIZES, build_model, matmul_peak
from torch import nn


def projections(model: nn.Module) -> list[tuple[int, int]]:
    """(out, in) of every linear layer, the LM head included."""
    return [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear)]


def projections_pass(weights: list[torch.Tensor], inputs: list[torch.Tensor], grads: list[torch.Tensor],
                     bf16: bool) -> None:
    """Each weight's forward and backward (input and weight gradients) on its own input, the
    output gradients given (made once, so that no fill is timed)."""
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        outputs = [nn.functional.linear(x, w) for x, w in zip(inputs, weights, strict=True)]
    torch.autograd.backward(outputs, grads)


def ceiling(weights: list[torch.Tensor], tokens: int, bf16: bool, seconds: float) -> float:
    """FLOP/s of :func:`projections_pass` over at least ``seconds`` after two warm-up passes."""
    inputs = [torch.randn(tokens, w.shape[1], requires_grad=True) for w in weights]
    dtype = torch.bfloat16 if bf16 else torch.float32
    grads = [torch.ones(tokens, w.shape[0], dtype=dtype) for w in weights]
    for _ in range(2):
        projections_pass(weights, inputs, grads, bf16)
    flops = 6 * tokens * sum(w.numel() for w in weights)
    done, start = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < seconds:
        projections_pass(weights, inputs, grads, bf16)
        done += 1
    return flops * done / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="44m", help=f"one of {sorted(MODEL_SIZES)} or <hidden>x<layers>")
    p.add_argument("--tokens", type=int, default=3000, help="packed tokens a pass (a DPO step's: ~3,000)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--seconds", type=float, default=30.0, help="the timed loop's least duration")
    args = p.parse_args()
    from alignlab.core.runtime import resolve_precision

    bf16 = resolve_precision(args.precision, torch.device("cpu")) == "bf16"

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(build_model(Path(tmp), args.model_size))
    weights = [torch.randn(o, i, requires_grad=True) for o, i in projections(model)]
    before = matmul_peak(bf16)
    rate = ceiling(weights, args.tokens, bf16, args.seconds)
    peak = max(before, matmul_peak(bf16))  # the higher of two: one read in a slow moment would flatter
    print(f"{sum(w.numel() for w in weights) / 1e6:.1f}M projection parameters ({args.model_size}), "
          f"{args.tokens} tokens a pass, {'bf16' if bf16 else 'fp32'}: {rate / 1e9:.1f} GFLOP/s "
          f"against a matmul peak of {peak / 1e9:.1f}")
    print(f"ceiling_mfu={rate / peak:.3f} projections_gflops={rate / 1e9:.1f} "
          f"peak_gflops={peak / 1e9:.1f} tokens={args.tokens}")


if __name__ == "__main__":
    main()
