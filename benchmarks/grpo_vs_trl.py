"""GRPO throughput: alignlab vs TRL's GRPOTrainer on the same tiny model, prompts and reward.

    pip install -e '.[bench]'          # installs trl; this script installs nothing itself
    python benchmarks/grpo_vs_trl.py [--steps 30 --prompts-per-step 8 --group-size 4]

Both sides start from the tiny world's base model (built once into a temporary cache), sample
``group_size`` completions for each of ``prompts_per_step`` review prompts per step (same
max completion length, temperature 1, top-p 1), score them with the same VADER sentiment reward,
and take one optimizer step per batch with group-normalised advantages, no KL term (TRL's
default beta=0) and the same learning rate, steps and precision. Each side runs in its own
subprocess so its peak RSS is its own; time is the training loop (generation included; model
loading and the final save excluded on both sides). Both sides run each step's completions as
one micro-batch (TRL: ``per_device_train_batch_size`` = prompts × group size).
TRL runs with its defaults (gradient checkpointing on). The last line is machine-readable:
``speedup_vs_trl=X mem_ratio_vs_trl=Z`` (completions/s ratio, peak-RSS ratio).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _harness import add_worker_args, peak_rss_mb, report, run_variant


def worker(variant: str, folder: Path, args: argparse.Namespace) -> dict:
    import torch

    from alignlab.core.runtime import cpu_supports_bf16
    from alignlab.world.build import ensure_world

    world = ensure_world("tiny", 0, str(folder / "cache"), progress=False)
    prompts = [json.loads(x)["prompt"] for x in (folder / "prompts.jsonl").read_text().splitlines()]
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_supports_bf16())
    n_completions = args.steps * args.prompts_per_step * args.group_size
    torch.manual_seed(0)
    if variant == "alignlab":
        from alignlab.algorithms.policy_gradient.config import OnlineRLConfig, RLSection
        from alignlab.algorithms.policy_gradient.run import train_policy_gradient
        from alignlab.core.config import (
            ModelSection,
            OnlineTrainSection,
            RolloutSection,
            WorldSection,
        )

        cfg = OnlineRLConfig(
            model=ModelSection(name_or_path=str(world.base_dir)),
            world=WorldSection(preset="tiny", cache_dir=str(folder / "cache")),
            train=OnlineTrainSection(output_dir=tempfile.mkdtemp(), max_steps=args.steps, lr=args.lr,
                                 precision="bf16" if bf16 else "fp32", device="cpu",
                                 batch_size=args.prompts_per_step * args.group_size,
                                 progress=False, tensorboard=False),
            rollout=RolloutSection(prompts=str(folder / "prompts.jsonl"), prompts_per_step=args.prompts_per_step,
                                   n=args.group_size, max_new_tokens=args.max_completion_length),
            rl=RLSection(reward="vader_sentiment", kl_coef=0.0, loss_aggregation="dapo",
                         minibatch_size=args.prompts_per_step * args.group_size))
        seconds = train_policy_gradient(cfg, "grpo").result.seconds  # the loop, as trainer.train() for TRL
    else:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer

        from alignlab.rewards.registry import get_reward

        vader = get_reward("vader_sentiment")

        def reward(prompts, completions, **_):
            return vader(list(prompts), list(completions))

        tok = AutoTokenizer.from_pretrained(world.base_dir)
        model = AutoModelForCausalLM.from_pretrained(world.base_dir, dtype=torch.float32)
        cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts_per_step * args.group_size,
                         num_generations=args.group_size, max_completion_length=args.max_completion_length,
                         max_steps=args.steps, learning_rate=args.lr, bf16=bf16, use_cpu=True, beta=0.0,
                         report_to="none", save_strategy="no", logging_steps=10_000, seed=0,
                         lr_scheduler_type="constant", warmup_steps=0, temperature=1.0, top_p=1.0)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, processing_class=tok,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return {"variant": variant, "seconds": seconds, "completions": n_completions,
            "completions_per_s": n_completions / seconds, "step_s": seconds / args.steps,
            "peak_rss_mb": peak_rss_mb(), "bf16": bf16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    add_worker_args(p)
    args = p.parse_args()
    if args.worker:
        report(worker(args.worker, Path(args.folder), args))
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("trl is not installed: pip install -e '.[bench]' (this script installs nothing)")
    from alignlab.world.build import ensure_world

    folder = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    world = ensure_world("tiny", 0, str(folder / "cache"), progress=False)
    prompts = world.task("positive").train_prompts
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))
    results = {}
    for variant in ("alignlab", "trl"):
        r = results[variant] = run_variant(__file__, args, variant, folder)
        print(f"{variant:9s} {r['completions_per_s']:7.1f} completions/s  {r['step_s']:6.2f} s/step  "
              f"{r['seconds']:6.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)
    ours, theirs = results["alignlab"], results["trl"]
    print(f"{args.steps} steps × {args.prompts_per_step} prompts × {args.group_size} completions, "
          f"max {args.max_completion_length} new tokens, {'bf16' if ours['bf16'] else 'fp32'}")
    print(f"speedup_vs_trl={ours['completions_per_s'] / theirs['completions_per_s']:.3f} "
          f"mem_ratio_vs_trl={ours['peak_rss_mb'] / theirs['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
