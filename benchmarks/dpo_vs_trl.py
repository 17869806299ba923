"""DPO throughput: alignlab vs TRL's DPOTrainer on the identical Llama and data.

    pip install -e '.[bench]'          # installs trl; this script installs nothing itself
    python benchmarks/dpo_vs_trl.py [--model-size 44m --steps 20 --batch-size 8 --prompt-tokens 128,512]
    python benchmarks/dpo_vs_trl.py --quick     # a seconds-long smoke run at toy shapes

Default shape: a 44M-parameter random-init Llama built locally (``_assets.py``: world
tokenizer, hidden 768, 6 layers), prompts of 128–512 tokens (a few reviews of context and a
review to continue), two short answers of ~10–30 tokens, 8 pairs per step, 20 steps.
Each variant runs in its own subprocess (so peak RSS is its own) on the same model, the same
prompt/chosen/rejected rows, the same batch, steps, learning rate, precision and max length.
Variants: alignlab (selective gradient checkpointing: the matmul outputs kept, the element-wise
ops recomputed; TRL's defaults checkpoint too), TRL with its defaults (which include gradient
checkpointing), and TRL's best configuration (padding_free, precompute_ref_log_probs, no gradient
checkpointing). On request: ``alignlab_full`` (every layer recomputed whole), ``alignlab_fast``
(no checkpointing) and ``alignlab_int8ref`` (as alignlab, the reference's matmuls in int8:
``preference.reference_quantization``, log-probs within the bound its test states); their ratios
print prefixed ``full_``, ``fast_``, ``int8ref_``. Time counts
the whole training call, reference log-probs included.
tokens/s counts every pair's two prompt+completion sequences (the prompt twice, as a trainer
without prefix sharing consumes them), the same count for every variant, so throughput ratios
compare like with like. Achieved FLOP/s counts the work a trainer must do, on the *unique*
tokens (prompt once + chosen + rejected): 6·N per token for the policy's forward+backward and
2·N for the reference forward (N = the parameters that take part in matmuls: all but the input
embedding table, a lookup; attention score FLOPs are not counted), the
same count for every variant, so prefix sharing does not inflate it. It is reported as a
fraction of a matmul peak measured on the spot in the training precision: the highest of one
measured at the end and one measured in each alignlab worker right after its timed run
(``_assets.highest_peak``: one reading in a slow moment would inflate the MFU). The last line is
machine-readable: ``speedup_vs_trl_default=X speedup_vs_trl_best=Y mem_ratio_vs_trl=Z mfu=W``
(memory against the smaller TRL variant's peak RSS) and ``peak_gflops``, ``trl_best`` (its
options), ``<variant>_reference_s`` and ``<variant>_train_s`` (the time split).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from _assets import (
    build_model,
    highest_peak,
    matmul_params,
    matmul_peak,
    review_contexts,
    token_lengths,
)
from _harness import add_worker_args, peak_rss_mb, report, require_trl, run_variant, step_timer

QUICK = {"model_size": "3m", "steps": 2, "batch_size": 2, "prompt_tokens": "16,48"}
TRL_BEST = {"padding_free": True, "precompute_ref_log_probs": True, "gradient_checkpointing": False}
# alignlab's variants: train.gradient_checkpointing, preference.reference_quantization
CHECKPOINTING = {"alignlab": "selective", "alignlab_full": True, "alignlab_int8ref": "selective",
                 "alignlab_fast": False}
QUANTIZATION = {"alignlab_int8ref": "int8"}


def build_assets(folder: Path, args: argparse.Namespace) -> None:
    """A world tokenizer, a random-init Llama and preference rows, written once for all variants."""
    from transformers import AutoTokenizer

    from alignlab.world import language as lang

    build_model(folder / "model", args.model_size, vocab=args.vocab)
    tok = AutoTokenizer.from_pretrained(folder / "model")
    lo, hi = map(int, args.prompt_tokens.split(","))
    rng = random.Random(1)
    rows = []
    for prompt, prefix in review_contexts(tok, args.steps * args.batch_size, lo, hi):
        # a long shared prompt and two short answers, as in chat data
        rows.append({"prompt": prompt, "chosen": lang.complete_review(rng, prefix, 1.0),
                     "rejected": lang.complete_review(rng, prefix, 0.0)})
    (folder / "rows.json").write_text(json.dumps(rows))


def count_tokens(tok, rows) -> tuple[int, int]:
    """(tokens of the 2·pairs prompt+completion sequences, unique tokens: prompt once per pair)."""
    sequences = unique = 0
    for r in rows:
        p = len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        unique += p
        for key in ("chosen", "rejected"):
            c = len(tok(r[key], add_special_tokens=False)["input_ids"]) + 1  # + eos
            sequences += p + c
            unique += c
    return sequences, unique


def worker(variant: str, folder: Path, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.core.runtime import cpu_supports_bf16

    torch.manual_seed(0)
    rows = json.loads((folder / "rows.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = matmul_params(model)  # a lookup is not a matmul
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_supports_bf16())
    tokens, unique_tokens = count_tokens(tok, rows)
    if variant.startswith("alignlab"):
        from alignlab.eval.preference_bench import benchmark_steps

        stats = benchmark_steps(model, tok, rows, steps=args.steps, batch_size=args.batch_size,
                                loss="dpo", beta=0.1, precision="bf16" if bf16 else "fp32",
                                device="cpu", lr=args.lr, max_length=args.max_length,
                                gradient_checkpointing=CHECKPOINTING[variant],
                                reference_quantization=QUANTIZATION.get(variant, "none"))
        extra = {"layout": stats["layout"], "step_seconds": stats["step_seconds"],
                 "gradient_checkpointing": CHECKPOINTING[variant],
                 "reference_quantization": QUANTIZATION.get(variant, "none"),
                 "precomputed_reference_seconds": stats["reference_seconds"]}
        reference, seconds = stats["reference_seconds"], stats["seconds"] + stats["reference_seconds"]
    else:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        best = variant == "trl_best"
        cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                        max_steps=args.steps, learning_rate=args.lr, beta=0.1, bf16=bf16, use_cpu=True,
                        max_length=args.max_length, report_to="none", save_strategy="no",
                        logging_steps=10_000, seed=0, lr_scheduler_type="constant", warmup_steps=0,
                        **(TRL_BEST if best else {}))
        # TRL tokenises and (precompute_ref_log_probs) runs the reference in __init__: the
        # reference passes are timed wherever they run, the tokenising is not (nor is ours)
        ref_time = [0.0]

        def timed(fn):
            def wrapper(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    ref_time[0] += time.perf_counter() - t
            return wrapper

        DPOTrainer._precompute_ref_logps = timed(DPOTrainer._precompute_ref_logps)
        timer = step_timer()
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[timer])
        if getattr(trainer, "ref_model", None) is not None:  # the reference inside each step
            started = [0.0]
            trainer.ref_model.register_forward_pre_hook(
                lambda *_: started.__setitem__(0, time.perf_counter()))
            trainer.ref_model.register_forward_hook(
                lambda *_: ref_time.__setitem__(0, ref_time[0] + time.perf_counter() - started[0]))
        before = ref_time[0]  # the precomputed reference, before the training call
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0 + before
        reference = ref_time[0]
        extra = {"gradient_checkpointing": cfg.gradient_checkpointing, "padding_free": cfg.padding_free,
                 "step_seconds": timer.seconds, "precomputed_reference_seconds": before}
    # policy forward+backward (6N) and one reference forward (2N) per unique token
    flops = 8 * n_matmul * unique_tokens
    if variant.startswith("alignlab"):  # beside its run: the MFU takes the highest (highest_peak)
        extra["peak_flops"] = matmul_peak(bf16)
    return {"variant": variant, "seconds": seconds, "reference_seconds": reference,
            "train_seconds": seconds - reference, "tokens": tokens,
            "unique_tokens": unique_tokens, "pairs": len(rows),
            "tokens_per_s": tokens / seconds, "pairs_per_s": len(rows) / seconds,
            "peak_rss_mb": peak_rss_mb(), "flops_per_s": flops / seconds, "n_params": n_params,
            "bf16": bf16, **extra}


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The options :func:`build_assets` and :func:`worker` read: model, data, steps, precision."""
    p.add_argument("--model-size", default="44m", help="3m, 13m, 44m, 100m or <hidden>x<layers>")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--prompt-tokens", default="128,512", help="min,max prompt length in tokens")
    p.add_argument("--max-length", type=int, default=1024, help="longer rows are cut (none at the defaults)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--variants", default="alignlab,trl_default,trl_best")
    p.add_argument("--quick", action="store_true", help=f"a smoke run at toy shapes: {QUICK}")
    add_worker_args(p)
    args = p.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    if args.worker:
        report(worker(args.worker, Path(args.folder), args))
        return
    require_trl()
    folder = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    build_assets(folder, args)
    results = {}
    for variant in args.variants.split(","):
        results[variant] = run_variant(__file__, args, variant, folder, skip=("variants", "quick"))
        r = results[variant]
        shown = ("layout", "gradient_checkpointing", "padding_free")
        print(f"{variant:12s} {r['tokens_per_s']:9.0f} tok/s {r['pairs_per_s']:7.2f} pairs/s "
              f"{r['seconds']:7.1f} s (reference {r['reference_seconds']:6.1f} s)  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB  {r['flops_per_s'] / 1e9:6.1f} GFLOP/s  "
              f"{json.dumps({k: v for k, v in r.items() if k in shown})}", flush=True)
    if "alignlab" not in results:
        return
    from transformers import AutoTokenizer

    rows = json.loads((folder / "rows.json").read_text())
    lengths = token_lengths(AutoTokenizer.from_pretrained(folder / "model"), [r["prompt"] for r in rows])
    bf16 = results["alignlab"]["bf16"]
    peak = highest_peak(bf16, results)
    ours = results["alignlab"]
    sd = ours["tokens_per_s"] / results["trl_default"]["tokens_per_s"] if "trl_default" in results else float("nan")
    sb = ours["tokens_per_s"] / results["trl_best"]["tokens_per_s"] if "trl_best" in results else float("nan")
    trl_mem = min((r["peak_rss_mb"] for k, r in results.items() if k.startswith("trl")),
                  default=float("nan"))
    mfu = ours["flops_per_s"] / peak
    print(f"model {ours['n_params'] / 1e6:.1f}M params ({args.model_size}), {ours['pairs']} pairs, "
          f"prompts {min(lengths)}–{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), "
          f"batch {args.batch_size}, {args.steps} steps, {'bf16' if bf16 else 'fp32'}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")
    split = " ".join(f"{v}_{part}_s={r[f'{part}_seconds'] / args.steps:.3f}"
                     for v, r in results.items() for part in ("reference", "train"))
    best = json.dumps(TRL_BEST, separators=(",", ":"))
    others = ""  # the other alignlab variants' ratios, prefixed with their suffix (int8ref_, ...)
    for v, r in results.items():
        if v.startswith("alignlab_"):
            tag = v[len("alignlab_"):]
            for key, other in (("speedup_vs_trl_default", "trl_default"), ("speedup_vs_trl_best", "trl_best")):
                if other in results:
                    others += f" {tag}_{key}={r['tokens_per_s'] / results[other]['tokens_per_s']:.3f}"
            others += (f" {tag}_mem_ratio_vs_trl={r['peak_rss_mb'] / trl_mem:.3f}"
                       f" {tag}_mfu={r['flops_per_s'] / peak:.3f}")
    print(f"speedup_vs_trl_default={sd:.3f} speedup_vs_trl_best={sb:.3f} "
          f"mem_ratio_vs_trl={ours['peak_rss_mb'] / trl_mem:.3f} mfu={mfu:.3f} "
          f"peak_gflops={peak / 1e9:.1f} trl_best={best} {split}{others}")


if __name__ == "__main__":
    main()
