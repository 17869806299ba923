"""Rollout throughput: alignlab's engine vs Hugging Face ``model.generate`` on the same model.

    python benchmarks/rollout_vs_generate.py [--model world|random --prompts 32 --n 4 --max-new-tokens 48]

Same model (the tiny world's pretrained base, or a random-init tiny Llama), same prompts, same
``n`` samples per prompt (``num_return_sequences`` for ``generate``), same ``max_new_tokens``,
sampling on (temperature 1, top-p 0.95) and eos stopping for both, one batch each. Each side is
timed ``--repeats`` times after a warm-up and the best time is kept. Also times the engine with
finished rows masked instead of dropped (``compact=False``). Last line:
``speedup_vs_generate=X``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch


def load(args):
    if args.model == "world":
        from transformers import AutoModelForCausalLM

        from alignlab.world.build import ensure_world

        world = ensure_world("tiny", seed=0, cache_dir=args.cache_dir, progress=False)
        tok = world.tokenizer()
        model = AutoModelForCausalLM.from_pretrained(world.base_dir)
        prompts = world.task("positive").train_prompts
    else:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["world", "random"], default="world")
    ap.add_argument("--cache-dir", default=os.environ.get("ALIGNLAB_TEST_CACHE", "/tmp/alignlab-bench"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from alignlab.rollout.engine import SamplingParams, rollout

    model, prompts, eos, pad, tok = load(args)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens,
                            n=args.n, seed=0)
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1

    @torch.inference_mode()
    def hf():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                              top_p=0.95, top_k=0, num_return_sequences=args.n,
                              max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=pad)

    def ours(compact=True):
        return rollout(model, prompts, params, eos_token_id=eos, pad_token_id=pad, tokenizer=tok,
                       batch_size=len(prompts) * args.n, compact=compact)

    warnings.simplefilter("ignore")
    n_completions = len(prompts) * args.n
    t_hf, seqs = best_time(hf, args.repeats)
    t_ours, rb = best_time(ours, args.repeats)
    t_masked, _ = best_time(lambda: ours(False), args.repeats)
    hf_len = (seqs[:, width:] != pad).sum(1).float().mean().item()
    print(f"model={args.model} prompts={len(prompts)} n={args.n} max_new_tokens={args.max_new_tokens} "
          f"threads={torch.get_num_threads()}")
    print(f"generate:            {n_completions / t_hf:8.1f} completions/s  ({t_hf:.3f} s, "
          f"mean completion {hf_len:.1f} tokens)")
    print(f"alignlab (drop done): {n_completions / t_ours:8.1f} completions/s  ({t_ours:.3f} s, "
          f"mean completion {rb.stats['mean_completion_tokens']:.1f} tokens, "
          f"hit length {rb.stats['frac_hit_length_limit']:.0%})")
    print(f"alignlab (mask done): {n_completions / t_masked:8.1f} completions/s  ({t_masked:.3f} s)")
    print(f"speedup_vs_generate={t_hf / t_ours:.2f}")


if __name__ == "__main__":
    main()
