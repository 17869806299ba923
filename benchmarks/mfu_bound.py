"""How far DPO's MFU can rise: the DPO benchmark's alignlab step with ops taken out of the model.

    python benchmarks/mfu_bound.py [--checkpointing selective|none --precision auto ...]
    python benchmarks/mfu_bound.py --quick      # a seconds-long smoke run at toy shapes

An Amdahl bound, not a method: it runs ``dpo_vs_trl.py``'s alignlab variant (same model, rows,
batch, steps, precision and FLOP count: ``8·N`` a unique token, attention scores not counted)
three times, each in its own process, the Llama's decoder patched so that ops which are not
projections cost nothing:

- ``real``: the model as it is (the MFU ``dpo_vs_trl.py`` prints);
- ``no_attention``: each attention layer returns ``o_proj(q + k + v)`` of its projections
  (``k`` and ``v`` repeated across grouped heads): no RoPE, scores, softmax or gathers, every
  projection still in forward and backward;
- ``matmuls_only``: as ``no_attention``, the RMS norms the identity and the MLP
  ``down(gate(x) + up(x))``: what is left is the projections, the embedding lookup, the loss,
  AdamW and Python.

The patched models compute nonsense on purpose; only their time means anything. If
``matmuls_only`` stays below a target, no attention or norm kernel, however fast, reaches it:
the projections (``matmul_ceiling.py``), the optimizer and the loss are what is left. The last
line is machine-readable: ``mfu=X mfu_no_attention=Y mfu_matmuls_only=Z peak_gflops=P
checkpointing=C``, ``attention_share`` (``1 − no_attention_s / real_s``: the part of a step
attention takes, RoPE and gathers included), ``norms_swiglu_share`` (``(no_attention_s −
matmuls_only_s) / real_s``) and ``<variant>_s`` (each variant's seconds a step, reference
included). The shares come from times alone, so the matmul peak's swing from run to run
(±10% on a shared 2-core machine) does not enter them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import dpo_vs_trl
from _assets import highest_peak
from _harness import add_worker_args, report, run_variant

VARIANTS = ("real", "no_attention", "matmuls_only")
# this script's --checkpointing -> the dpo_vs_trl variant that trains that way
CHECKPOINTING = {"selective": "alignlab", "none": "alignlab_fast", "full": "alignlab_full"}


def attention_stand_in(self, hidden_states, *args, **kwargs):
    """``o_proj(q + k + v)``: the attention layer's four projections, nothing between them."""
    q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    groups = q.shape[-1] // k.shape[-1]
    return self.o_proj(q + (k + v).repeat_interleave(groups, dim=-1)), None


def mlp_stand_in(self, x):
    """``down(gate(x) + up(x))``: the MLP's three projections, no SiLU or product."""
    return self.down_proj(self.gate_proj(x) + self.up_proj(x))


def ablate(variant: str) -> None:
    """Patch transformers' Llama classes in this (worker) process for ``variant``."""
    from transformers.models.llama import modeling_llama

    if variant in ("no_attention", "matmuls_only"):
        modeling_llama.LlamaAttention.forward = attention_stand_in
    if variant == "matmuls_only":
        modeling_llama.LlamaRMSNorm.forward = lambda self, x: x
        modeling_llama.LlamaMLP.forward = mlp_stand_in


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dpo_vs_trl.add_shape_args(p)  # the same shape as the DPO benchmark, whose worker runs here
    p.add_argument("--checkpointing", choices=sorted(CHECKPOINTING), default="selective",
                   help="selective: dpo_vs_trl.py's headline alignlab variant; none: its alignlab_fast")
    p.add_argument("--quick", action="store_true", help=f"a smoke run at toy shapes: {dpo_vs_trl.QUICK}")
    add_worker_args(p)
    args = p.parse_args()
    if args.quick:
        vars(args).update(dpo_vs_trl.QUICK)
    if args.worker:
        ablate(args.worker)
        report(dpo_vs_trl.worker(CHECKPOINTING[args.checkpointing], Path(args.folder), args))
        return
    folder = Path(tempfile.mkdtemp(prefix="mfu-bound-"))
    dpo_vs_trl.build_assets(folder, args)
    results = {}
    for variant in VARIANTS:
        r = results[variant] = run_variant(__file__, args, variant, folder, skip=("quick",))
        print(f"{variant:13s} {r['seconds'] / args.steps:6.3f} s a step (reference "
              f"{r['reference_seconds'] / args.steps:.3f} s)  {r['flops_per_s'] / 1e9:6.1f} GFLOP/s",
              flush=True)
    peak = highest_peak(results["real"]["bf16"], results)
    mfu = {v: r["flops_per_s"] / peak for v, r in results.items()}
    print(f"{'bf16' if results['real']['bf16'] else 'fp32'}, checkpointing {args.checkpointing}, "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s: MFU {json.dumps({v: round(m, 3) for v, m in mfu.items()})}")
    seconds = {v: r["seconds"] / args.steps for v, r in results.items()}
    times = " ".join(f"{v}_s={s:.3f}" for v, s in seconds.items())
    # shares of the real step, from times alone (the peak moves from run to run; these less)
    attention = 1 - seconds["no_attention"] / seconds["real"]
    elementwise = (seconds["no_attention"] - seconds["matmuls_only"]) / seconds["real"]
    print(f"mfu={mfu['real']:.3f} mfu_no_attention={mfu['no_attention']:.3f} "
          f"mfu_matmuls_only={mfu['matmuls_only']:.3f} peak_gflops={peak / 1e9:.1f} "
          f"checkpointing={args.checkpointing} attention_share={attention:.3f} "
          f"norms_swiglu_share={elementwise:.3f} {times}")


if __name__ == "__main__":
    main()
