"""Rollout throughput: alignlab's engine vs Hugging Face ``model.generate`` on the same model.

    python benchmarks/rollout_vs_generate.py [--model bench --prompts 8 --n 8 --max-new-tokens 128]
    python benchmarks/rollout_vs_generate.py --quick      # a seconds-long smoke run

Default: the GRPO benchmark's shape (``grpo_vs_trl.py``): its 44M random-init Llama built
locally (``--model-size``), 8 review prompts of 64–256 tokens, 8 samples each, up to 128 new
tokens. ``--model world`` takes the tiny world's pretrained base and its prompts, ``--model
random`` a 2-layer random Llama. Same prompts, same ``n`` samples per prompt
(``num_return_sequences`` for ``generate``), same ``max_new_tokens``, sampling on (temperature
1, top-p 0.95) and eos stopping for both, one batch each, in ``--precision`` (bf16: both under
bf16 autocast). Each side is timed ``--repeats``
times after a warm-up and the best time is kept. Also times the engine with finished rows
masked instead of dropped (``compact=False``) and ``generate`` with a static (preallocated)
cache. What the engine does that ``generate`` does not: each distinct prompt is prefilled once
(not ``n`` times); the KV cache is written in place (no copy of the whole cache per token); on
CPU each prompt's keys and values are read once per step for all its samples
(``rollout/kv_cache.py``); finished rows leave the batch. Each side runs in its own process
(``_harness.run_variant``), ``generate`` as its users run it: with oneDNN's and glibc's own
settings, not the ones importing alignlab makes (``alignlab/core/heap.py``; in one process
``generate``, whose cache grows by a copy every token, took 18.5 s instead of 26.5 s with
alignlab's heap settings). Last line:
``speedup_vs_generate=X speedup_vs_generate_static=Y tokens_per_s=Z generate_tokens_per_s=W``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _harness import add_worker_args, report, run_variant


def load(args):
    if args.model == "bench":
        from _assets import review_prompts
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(args.folder)  # built once by the parent for both sides
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        lo, hi = map(int, args.prompt_tokens.split(","))
        prompts = review_prompts(tok, args.prompts, lo, hi)
    elif args.model == "world":
        from transformers import AutoModelForCausalLM

        from alignlab.world.build import ensure_world

        world = ensure_world("tiny", seed=0, cache_dir=args.cache_dir, progress=False)
        tok = world.tokenizer()
        model = AutoModelForCausalLM.from_pretrained(world.base_dir)
        prompts = world.task("positive").train_prompts
    else:  # random
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=192, max_position_embeddings=256,
                          pad_token_id=0, eos_token_id=1)
        model, tok = LlamaForCausalLM(cfg), None
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, 512, (int(torch.randint(4, 16, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(args.prompts)]
    model.eval()
    if tok is not None:
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[:args.prompts]]
        return model, ids, tok.eos_token_id, tok.pad_token_id, tok
    return model, prompts, 1, 0, None


def best_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def worker(args: argparse.Namespace) -> dict:
    """One side, timed in this process: ``generate`` (dynamic and static cache) or ``alignlab``
    (finished rows dropped and masked)."""
    from alignlab.core.runtime import autocast, resolve_precision
    from alignlab.rollout.engine import SamplingParams, rollout

    model, prompts, eos, pad, tok = load(args)
    cpu = torch.device("cpu")
    precision = resolve_precision(args.precision, cpu)
    warnings.simplefilter("ignore")
    info = {"precision": precision, "threads": torch.get_num_threads(), "prompts": len(prompts)}
    if args.worker == "alignlab":
        # the engine's forwards under autocast in the trainer's precision
        params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens,
                                n=args.n, seed=0, precision=precision)

        def ours(compact=True):
            return rollout(model, prompts, params, eos_token_id=eos, pad_token_id=pad, tokenizer=tok,
                           batch_size=len(prompts) * args.n, compact=compact)

        t_ours, rb = best_time(ours, args.repeats)
        t_masked, _ = best_time(lambda: ours(False), args.repeats)
        return {**info, "seconds": t_ours, "masked_seconds": t_masked,
                "mean_completion_tokens": rb.stats["mean_completion_tokens"],
                "frac_hit_length_limit": rb.stats["frac_hit_length_limit"]}
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1

    # under the same autocast as the engine (as TRL runs it under accelerate's bf16 mixed
    # precision), and under no_grad as TRL calls it: under inference_mode autocast recasts the
    # weights at every token
    @torch.no_grad()
    def hf(**cache):
        with autocast(cpu, precision):
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                  top_p=0.95, top_k=0, num_return_sequences=args.n,
                                  max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                  **cache)

    t_hf, seqs = best_time(hf, args.repeats)
    t_static, _ = best_time(lambda: hf(cache_implementation="static"), args.repeats)
    return {**info, "seconds": t_hf, "static_seconds": t_static,
            "mean_completion_tokens": (seqs[:, width:] != pad).sum(1).float().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["bench", "world", "random"], default="bench")
    ap.add_argument("--model-size", default="44m", help="--model bench: 3m, 13m, 44m, 100m or <hidden>x<layers>")
    ap.add_argument("--prompt-tokens", default="64,256", help="--model bench: min,max prompt tokens")
    ap.add_argument("--cache-dir", default=os.environ.get("ALIGNLAB_TEST_CACHE", "/tmp/alignlab-bench"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="bf16: both sides under bf16 autocast (auto: bf16 where the CPU has it)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3m model, 2 prompts x 4, 16 tokens")
    add_worker_args(ap)
    args = ap.parse_args()
    if args.quick:
        vars(args).update(model_size="3m", prompts=2, n=4, max_new_tokens=16, repeats=1,
                          prompt_tokens="16,32")
    if args.worker:
        report(worker(args))
        return
    folder = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    if args.model == "bench":
        from _assets import build_model

        build_model(folder, args.model_size)
    hf = run_variant(__file__, args, "generate", folder, skip=("quick",))
    ours = run_variant(__file__, args, "alignlab", folder, skip=("quick",))
    n_completions = ours["prompts"] * args.n
    print(f"model={args.model} prompts={ours['prompts']} n={args.n} max_new_tokens={args.max_new_tokens} "
          f"threads={ours['threads']} precision={ours['precision']}")
    print(f"generate:            {n_completions / hf['seconds']:8.1f} completions/s  ({hf['seconds']:.3f} s, "
          f"mean completion {hf['mean_completion_tokens']:.1f} tokens)")
    print(f"alignlab (drop done): {n_completions / ours['seconds']:8.1f} completions/s  "
          f"({ours['seconds']:.3f} s, mean completion {ours['mean_completion_tokens']:.1f} tokens, "
          f"hit length {ours['frac_hit_length_limit']:.0%})")
    print(f"generate (static):   {n_completions / hf['static_seconds']:8.1f} completions/s  "
          f"({hf['static_seconds']:.3f} s)")
    print(f"alignlab (mask done): {n_completions / ours['masked_seconds']:8.1f} completions/s  "
          f"({ours['masked_seconds']:.3f} s)")
    # tokens/s ratios: the two sample different tokens, so their lengths differ a little
    ours_tps = n_completions * ours["mean_completion_tokens"] / ours["seconds"]
    hf_tps = n_completions * hf["mean_completion_tokens"] / hf["seconds"]
    print(f"speedup_vs_generate={hf['seconds'] / ours['seconds']:.2f} "
          f"speedup_vs_generate_static={hf['static_seconds'] / ours['seconds']:.2f} "
          f"tokens_per_s={ours_tps:.1f} generate_tokens_per_s={hf_tps:.1f} "
          f"tokens_per_s_ratio={ours_tps / hf_tps:.2f}")


if __name__ == "__main__":
    main()
