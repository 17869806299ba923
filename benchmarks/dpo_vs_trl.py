"""DPO throughput: alignlab vs TRL's DPOTrainer on the identical tiny Llama and data.

    pip install -e '.[bench]'          # installs trl; this script installs nothing itself
    python benchmarks/dpo_vs_trl.py [--steps 30 --batch-size 16 --hidden 512 --layers 4]

Each variant runs in its own subprocess (so peak RSS is its own) on the same random-init tiny
Llama (saved once), the same prompt/chosen/rejected rows, the same batch, steps, learning rate,
precision and max length. Variants: alignlab, TRL with its defaults (which include gradient
checkpointing), and TRL's best configuration (padding_free, precompute_ref_log_probs, no
gradient checkpointing). Time counts the whole training call, reference log-probs included.
tokens/s counts every pair's two prompt+completion sequences (the prompt twice, as a trainer
without prefix sharing consumes them), the same count for every variant, so throughput ratios
compare like with like. Achieved FLOP/s counts the work a trainer must do, on the *unique*
tokens (prompt once + chosen + rejected): 6·N per token for the policy's forward+backward and
2·N for the reference forward (N = the parameters that take part in matmuls: all but the input
embedding table, a lookup; attention score FLOPs are not counted), the
same count for every variant, so prefix sharing does not inflate it. It is reported as a
fraction of a matmul peak measured on the spot. The last line is machine-readable:
``speedup_vs_trl_default=X speedup_vs_trl_best=Y mem_ratio_vs_trl=Z mfu=W``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from _harness import add_worker_args, peak_rss_mb, report, run_variant


def build_assets(folder: Path, args: argparse.Namespace) -> None:
    """A world tokenizer, a random-init Llama and preference rows, written once for all variants."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignlab.world import language as lang
    from alignlab.world.tokenizer import train_tokenizer

    corpus = lang.generate_corpus(0, 3000)
    tok = train_tokenizer(corpus, vocab_size=args.vocab)
    tok.save_pretrained(folder / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      intermediate_size=int(args.hidden * 8 / 3) // 64 * 64, max_position_embeddings=1024,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder / "model")
    rng = random.Random(0)
    rows = []
    for _ in range(args.steps * args.batch_size):
        # a long shared prompt (a few reviews of context) and two short answers, as in chat data
        context = " ".join(lang.generate_review(rng) for _ in range(args.context_reviews))
        prefix = lang.random_review_prefix(rng)
        prompt = f"{context} {prefix.text}"
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
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    n_matmul = n_params - (0 if tied else embedding.numel())  # a lookup is not a matmul
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_supports_bf16())
    tokens, unique_tokens = count_tokens(tok, rows)
    t0 = time.perf_counter()
    if variant == "alignlab":
        from alignlab.eval.preference_bench import benchmark_steps

        stats = benchmark_steps(model, tok, rows, steps=args.steps, batch_size=args.batch_size,
                                loss="dpo", beta=0.1, precision="bf16" if bf16 else "fp32",
                                device="cpu", lr=args.lr, max_length=args.max_length)
        extra = {k: stats[k] for k in ("reference_seconds", "layout") if k in stats}
    else:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        best = variant == "trl_best"
        cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                        max_steps=args.steps, learning_rate=args.lr, beta=0.1, bf16=bf16, use_cpu=True,
                        max_length=args.max_length, report_to="none", save_strategy="no",
                        logging_steps=10_000, seed=0, lr_scheduler_type="constant", warmup_steps=0,
                        **({"padding_free": True, "precompute_ref_log_probs": True,
                            "gradient_checkpointing": False} if best else {}))
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
        t0 = time.perf_counter()  # TRL tokenises in __init__; time its training call like ours
        trainer.train()
        extra = {"gradient_checkpointing": cfg.gradient_checkpointing, "padding_free": cfg.padding_free}
    seconds = time.perf_counter() - t0
    if variant == "alignlab":
        seconds = stats["seconds"] + stats.get("reference_seconds", 0.0)
    # policy forward+backward (6N) and one reference forward (2N) per unique token
    flops = 8 * n_matmul * unique_tokens
    return {"variant": variant, "seconds": seconds, "tokens": tokens,
            "unique_tokens": unique_tokens, "pairs": len(rows),
            "tokens_per_s": tokens / seconds, "pairs_per_s": len(rows) / seconds,
            "peak_rss_mb": peak_rss_mb(), "flops_per_s": flops / seconds, "n_params": n_params,
            "bf16": bf16, **extra}


def matmul_peak(bf16: bool, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square matmul on this machine now, in the training precision."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--context-reviews", type=int, default=6)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--variants", default="alignlab,trl_default,trl_best")
    add_worker_args(p)
    args = p.parse_args()
    if args.worker:
        report(worker(args.worker, Path(args.folder), args))
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("trl is not installed: pip install -e '.[bench]' (this script installs nothing)")
    folder = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    build_assets(folder, args)
    results = {}
    for variant in args.variants.split(","):
        results[variant] = run_variant(__file__, args, variant, folder, skip=("variants",))
        r = results[variant]
        print(f"{variant:12s} {r['tokens_per_s']:9.0f} tok/s {r['pairs_per_s']:7.2f} pairs/s "
              f"{r['seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
              f"{r['flops_per_s'] / 1e9:6.1f} GFLOP/s  {json.dumps({k: v for k, v in r.items() if k in ('layout', 'reference_seconds', 'gradient_checkpointing', 'padding_free')})}",
              flush=True)
    if "alignlab" not in results:
        return
    bf16 = results["alignlab"]["bf16"]
    peak = matmul_peak(bf16)
    ours = results["alignlab"]
    sd = ours["tokens_per_s"] / results["trl_default"]["tokens_per_s"] if "trl_default" in results else float("nan")
    sb = ours["tokens_per_s"] / results["trl_best"]["tokens_per_s"] if "trl_best" in results else float("nan")
    trl_mem = min((r["peak_rss_mb"] for k, r in results.items() if k.startswith("trl")),
                  default=float("nan"))
    mfu = ours["flops_per_s"] / peak
    print(f"model {ours['n_params'] / 1e6:.1f}M params, {ours['pairs']} pairs, batch {args.batch_size}, "
          f"{args.steps} steps, {'bf16' if bf16 else 'fp32'}; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"speedup_vs_trl_default={sd:.3f} speedup_vs_trl_best={sb:.3f} "
          f"mem_ratio_vs_trl={ours['peak_rss_mb'] / trl_mem:.3f} mfu={mfu:.3f}")


if __name__ == "__main__":
    main()
