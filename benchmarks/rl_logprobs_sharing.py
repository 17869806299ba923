"""Policy log-probs of an RL batch: prefix sharing vs the plain padded path, same model and batch.

    python benchmarks/rl_logprobs_sharing.py [--prompt-tokens 256 --group-size 8 --prompts 4]

A GRPO-shaped batch (``--prompts`` prompts of about ``--prompt-tokens`` tokens, ``--group-size``
sampled completions each, of uneven length up to ``--completion-tokens``), laid out as
``RolloutRole.to_batch`` does (one right-padded row per completion), on a random-init Llama
(``--hidden``, ``--layers``). It times the policy's forward+backward of the token log-probs
(``token_logprobs`` with and without ``prefix_sharing``) under bf16 autocast where supported,
best of ``--repeats`` after a warm-up, and checks that the values agree. Last line:
``speedup_vs_plain=X``.
"""

from __future__ import annotations

import argparse
import time

import torch


def rl_batch(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    from alignlab.data.collate import completion_rows

    g = torch.Generator().manual_seed(0)
    rows, starts = [], []
    for _ in range(args.prompts):
        n_prompt = int(torch.randint(args.prompt_tokens // 2, args.prompt_tokens + 1, (1,), generator=g))
        prompt = torch.randint(3, vocab, (n_prompt,), generator=g).tolist()
        for _ in range(args.group_size):
            n = int(torch.randint(4, args.completion_tokens + 1, (1,), generator=g))
            rows.append(prompt + torch.randint(3, vocab, (n,), generator=g).tolist())
            starts.append(n_prompt)
    return completion_rows(rows, starts, 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--completion-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from alignlab.core.runtime import autocast, cpu_supports_bf16
    from alignlab.models.logprobs import token_logprobs

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    batch = rl_batch(args, args.vocab)
    precision = "bf16" if cpu_supports_bf16() else "fp32"
    device = torch.device("cpu")
    results, values = {}, {}
    for name, sharing in (("plain", False), ("shared", True)):
        best = float("inf")
        for i in range(args.repeats + 1):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            with autocast(device, precision):
                lp = token_logprobs(model, batch, prefix_sharing=sharing)
            (lp.sum() / batch["loss_mask"].sum()).backward()
            if i:  # the first run warms up
                best = min(best, time.perf_counter() - t)
        results[name], values[name] = best, lp.detach()
    rows, width = batch["input_ids"].shape
    print(f"{rows} rows x {width} padded slots ({int(batch['attention_mask'].sum())} real, "
          f"{int(batch['loss_mask'].sum())} completion tokens), "
          f"{sum(q.numel() for q in model.parameters()) / 1e6:.1f}M params, {precision}")
    for name, seconds in results.items():
        print(f"{name:7s} {seconds * 1000:8.1f} ms forward+backward")
    diff = float((values["plain"] - values["shared"]).abs().max())
    print(f"max |Δ log p| {diff:.2e}")
    print(f"speedup_vs_plain={results['plain'] / results['shared']:.3f}")


if __name__ == "__main__":
    main()
