"""Memory per role of an RLHF step for 0.5B, 7B and 70B models (docs/scaling.md's table).

Worked out from each model's config by ``alignlab.models.memory`` (the parameter count of the
model built on the meta device; the other terms checked against a real model in
tests/test_models_memory.py). The configs are the published shapes of Qwen2.5-0.5B, Llama-2-7B
and Llama-3-70B, written out here so nothing is downloaded.

    python benchmarks/memory_per_role.py [--micro-batch-tokens 12288] [--shards 8]
"""

from __future__ import annotations

import argparse

from transformers import LlamaConfig, Qwen2Config

from alignlab.models.memory import ModelShape, Workload, role_memory

MODELS = {
    "0.5B (Qwen2.5-0.5B)": Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "7B (Llama-2-7B)": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32),
    "70B (Llama-3-70B)": LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8),
}

GIB = 1024**3


def gib(n: int) -> str:
    return f"{n / GIB:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batch-tokens", type=int, default=8 * 1536,
                    help="tokens of one training micro-batch (8 sequences of 512 + 1024)")
    ap.add_argument("--rollout-sequences", type=int, default=512, help="64 prompts x 8 samples")
    ap.add_argument("--rollout-tokens", type=int, default=1536, help="prompt + completion")
    ap.add_argument("--shards", type=int, default=8, help="devices the training state is split over")
    ap.add_argument("--lora-rank", type=int, default=16)
    args = ap.parse_args()

    print(f"micro-batch {args.micro_batch_tokens} tokens, gradient checkpointing on; rollout "
          f"{args.rollout_sequences} sequences x {args.rollout_tokens} tokens; 16-bit weights, "
          f"AdamW with fp32 master weights and moments; GiB per device\n")
    header = ("| model | params | actor: weights / grads / optimizer / activations / logits | "
              f"actor, ZeRO-3 over {args.shards} | actor, LoRA r={args.lora_rank} | "
              "reference | reward | critic | rollout: weights + KV cache |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, config in MODELS.items():
        shape = ModelShape.from_config(config)
        work = Workload(args.micro_batch_tokens, args.rollout_sequences, args.rollout_tokens)
        actor = role_memory(shape, "actor", work)
        sharded = role_memory(shape, "actor", Workload(
            args.micro_batch_tokens, args.rollout_sequences, args.rollout_tokens,
            shards=args.shards, zero_stage=3))
        lora = role_memory(shape, "actor", Workload(
            args.micro_batch_tokens, args.rollout_sequences, args.rollout_tokens,
            lora_rank=args.lora_rank))
        critic = role_memory(shape, "critic", work)
        rollout = role_memory(shape, "rollout", work)
        parts = " / ".join(gib(actor[k]) for k in
                           ("weights", "gradients", "optimizer", "activations", "logits"))
        print(f"| {name} | {shape.params / 1e9:.2f}B | {parts} = **{gib(sum(actor.values()))}** "
              f"| {gib(sum(sharded.values()))} | {gib(sum(lora.values()))} "
              f"| {gib(role_memory(shape, 'reference', work)['weights'])} "
              f"| {gib(role_memory(shape, 'reward', work)['weights'])} "
              f"| {gib(sum(critic.values()))} "
              f"| {gib(rollout['weights'])} + {gib(rollout['kv_cache'])} |")


if __name__ == "__main__":
    main()
