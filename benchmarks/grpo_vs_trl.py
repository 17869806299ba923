"""GRPO throughput: alignlab vs TRL's GRPOTrainer on the same model, prompts, reward and shape.

    pip install -e '.[bench]'          # installs trl; this script installs nothing itself
    python benchmarks/grpo_vs_trl.py [--model-size 44m --steps 20 --prompts-per-step 8 \
        --group-size 8 --prompt-tokens 64,256 --max-completion-length 128]
    python benchmarks/grpo_vs_trl.py --quick     # a seconds-long smoke run at toy shapes

Default shape: a 44M-parameter random-init Llama built locally (``_assets.py``: world
tokenizer, hidden 768, 6 layers), review prompts of 64–256 tokens, 8 completions per prompt of
up to 128 new tokens, 8 prompts per step, 20 steps. Every side samples ``group_size``
completions of each prompt per step (same max completion length, temperature 1, top-p 1),
scores them with the same VADER sentiment reward and takes one optimizer step per batch with
group-normalised advantages, no KL term (TRL's default beta=0), the same learning rate and
precision, and the same micro-batch: ``--micro-batch`` completions per forward/backward (16,
two prompts' groups; TRL: ``per_device_train_batch_size`` with gradient accumulation over the
step's completions, which it samples in one ``generate`` call as alignlab does). Each side runs in its own subprocess
so its peak RSS is its own; time is the training loop (generation included; model loading and
the final save excluded on both sides; alignlab writes no checkpoint, TRL ``save_strategy="no"``).

Variants: ``alignlab`` (with gradient checkpointing, the memory policy of TRL's defaults: at this
shape the update's activations, not the weights, decide the peak, ~0.9 GB of a micro-batch
without it); ``alignlab_fast`` (without; not run unless named in ``--variants``: faster
updates, more memory; its ratios print as ``fast_*``); ``alignlab_selective`` (selective
checkpointing: the matmuls' outputs kept; on request, ratios ``selective_*``); ``trl_default`` (TRL's defaults: gradient checkpointing on,
``model.generate`` with transformers' DynamicCache); ``trl_best`` (the fastest TRL options
measured on CPU: gradient checkpointing off and ``cache_implementation="static"``, whose
preallocated cache sampled 1.8x faster than the default; transformers' continuous batching
sampled at 0.6x; benchmarks/README.md; ``--trl-best`` adds options as JSON). Per side the time is split into
rollout (sampling), reward, reference/old log-probs (no-grad passes) and update (the
gradient passes and optimizer steps, and what else the loop does), seconds per step.

MFU counts the matmul work a trainer must do on the *unique* tokens: 2·N per prompt token
(prefill, once per prompt), 2·N per sampled token (decode), 6·N per token of the update's
prompt-once + completions sequences (N = parameters in matmuls, attention scores not counted),
the same count for every variant, against a matmul peak measured on the spot in the training
precision (the highest of one at the end and one in each alignlab worker right after its timed
run: ``_assets.highest_peak``). The last line is machine-readable: ``speedup_vs_trl=X`` (completions/s against TRL's
defaults) ``speedup_vs_trl_best=Y mem_ratio_vs_trl=Z`` (peak RSS against the smaller TRL
variant's) ``mfu=W`` and the time split ``<variant>_<part>_s`` per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _assets import (
    build_model,
    highest_peak,
    matmul_params,
    matmul_peak,
    review_prompts,
    token_lengths,
)
from _harness import add_worker_args, peak_rss_mb, report, require_trl, run_variant, step_timer

PARTS = ("rollout", "reward", "logprobs", "update")
TRL_BEST = {"gradient_checkpointing": False, "cache_implementation": "static"}
# alignlab's variants by train.gradient_checkpointing
CHECKPOINTING = {"alignlab": True, "alignlab_selective": "selective", "alignlab_fast": False}
QUICK = {"model_size": "3m", "steps": 2, "prompts_per_step": 2, "group_size": 4,
         "prompt_tokens": "16,32", "max_completion_length": 16}


def micro_batch(args: argparse.Namespace) -> int:
    """Completions per forward/backward (both sides): ``--micro-batch``, at most a step's."""
    rows = args.prompts_per_step * args.group_size
    micro = min(getattr(args, "micro_batch", rows) or rows, rows)
    if rows % micro:
        sys.exit(f"--micro-batch {micro} must divide the {rows} completions of a step")
    return micro


def alignlab_worker(folder: Path, args: argparse.Namespace, bf16: bool,
                    checkpointing: bool | str = False) -> dict:
    from alignlab.algorithms.policy_gradient.config import OnlineRLConfig, RLSection
    from alignlab.algorithms.policy_gradient.run import train_policy_gradient
    from alignlab.core.config import ModelSection, OnlineTrainSection, RolloutSection

    rows = args.prompts_per_step * args.group_size
    cfg = OnlineRLConfig(
        model=ModelSection(name_or_path=str(folder / "model")),
        train=OnlineTrainSection(output_dir=tempfile.mkdtemp(), max_steps=args.steps, lr=args.lr,
                                 precision="bf16" if bf16 else "fp32", device="cpu",
                                 batch_size=micro_batch(args), save_every=None, progress=False,
                                 tensorboard=False, gradient_checkpointing=checkpointing),
        rollout=RolloutSection(prompts=str(folder / "prompts.jsonl"),
                               prompts_per_step=args.prompts_per_step, n=args.group_size,
                               max_new_tokens=args.max_completion_length, batch_size=rows),
        rl=RLSection(reward="vader_sentiment", kl_coef=0.0, loss_aggregation="dapo",
                     minibatch_size=rows))
    run = train_policy_gradient(cfg, "grpo")
    hist = run.result.history
    split = {part: sum(h.get(f"time_{key}", 0.0) for h in hist)
             for part, key in (("rollout", "rollout"), ("reward", "reward"),
                               ("logprobs", "batches"), ("update", "update"))}
    tokens = sum(h["response_length"] for h in hist) * rows
    steps = [sum(h.get(f"time_{key}", 0.0) for key in ("rollout", "reward", "batches", "update"))
             for h in hist]
    return {"seconds": run.result.seconds, "split": split, "sampled_tokens": tokens,
            "step_seconds": steps, "model": run.model}


def trl_worker(folder: Path, args: argparse.Namespace, bf16: bool, best: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from alignlab.rewards.registry import get_reward

    vader = get_reward("vader_sentiment")

    def reward(prompts, completions, **_):
        return vader(list(prompts), list(completions))

    prompts = [json.loads(x)["prompt"] for x in (folder / "prompts.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    options = {**TRL_BEST, **json.loads(args.trl_best)} if best else {}
    micro = micro_batch(args)
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=micro,
                     gradient_accumulation_steps=args.prompts_per_step * args.group_size // micro,
                     num_generations=args.group_size, max_completion_length=args.max_completion_length,
                     max_steps=args.steps, learning_rate=args.lr, bf16=bf16, use_cpu=True, beta=0.0,
                     report_to="none", save_strategy="no", logging_steps=10_000, seed=0,
                     lr_scheduler_type="constant", warmup_steps=0, temperature=1.0, top_p=1.0,
                     **options)
    timer = step_timer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          callbacks=[timer])
    split = dict.fromkeys(PARTS, 0.0)
    sampled = [0]

    def timed(part, fn, when=lambda: True, after=None):
        def wrapper(*a, **k):
            if not when():
                return fn(*a, **k)
            t = time.perf_counter()
            out = fn(*a, **k)
            split[part] += time.perf_counter() - t
            if after is not None:
                after(out)
            return out
        return wrapper

    def count(out):  # _generate returns (prompt_ids, completion_ids, ...)
        sampled[0] += sum(len(c) for c in out[1])

    trainer._generate = timed("rollout", trainer._generate, after=count)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(
        "logprobs", trainer._get_per_token_logps_and_entropies, lambda: not torch.is_grad_enabled())
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    split["update"] = seconds - split["rollout"] - split["reward"] - split["logprobs"]
    return {"seconds": seconds, "split": split, "sampled_tokens": sampled[0], "model": model,
            "step_seconds": timer.seconds, "options": options}


def worker(variant: str, folder: Path, args: argparse.Namespace) -> dict:
    import torch

    from alignlab.core.runtime import cpu_supports_bf16

    bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_supports_bf16())
    torch.manual_seed(0)
    if variant.startswith("alignlab"):
        out = alignlab_worker(folder, args, bf16, checkpointing=CHECKPOINTING[variant])
    else:
        out = trl_worker(folder, args, bf16, best=variant == "trl_best")
    n_completions = args.steps * args.prompts_per_step * args.group_size
    # the matmul work every variant must do (module docstring): prefill, decode, update
    prompt_tokens = args.steps * args.prompts_per_step * json.loads((folder / "mean_prompt_tokens").read_text())
    n = matmul_params(out.pop("model"))
    flops = n * (2 * prompt_tokens + 2 * out["sampled_tokens"] + 6 * (prompt_tokens + out["sampled_tokens"]))
    seconds = out["seconds"]
    if variant.startswith("alignlab"):  # beside its run: the MFU takes the highest (highest_peak)
        out["peak_flops"] = matmul_peak(bf16)
    return {"variant": variant, **out, "completions": n_completions,
            "completions_per_s": n_completions / seconds, "step_s": seconds / args.steps,
            "split_per_step": {k: v / args.steps for k, v in out["split"].items()},
            "flops_per_s": flops / seconds, "n_params": n, "peak_rss_mb": peak_rss_mb(), "bf16": bf16}


def _ratio(a: dict, b: dict | None, key: str) -> float:
    return a[key] / b[key] if b is not None else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="44m", help="3m, 13m, 44m, 100m or <hidden>x<layers>")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-tokens", default="64,256", help="min,max prompt length in tokens")
    p.add_argument("--max-completion-length", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=16,
                   help="completions per forward/backward on both sides (TRL: gradient accumulation)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--variants", default="alignlab,trl_default,trl_best")
    p.add_argument("--trl-best", default="{}", help="JSON of GRPOConfig options added to trl_best's")
    p.add_argument("--quick", action="store_true", help=f"a smoke run at toy shapes: {QUICK}")
    add_worker_args(p)
    args = p.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    if args.worker:
        report(worker(args.worker, Path(args.folder), args))
        return
    require_trl()
    from transformers import AutoTokenizer

    folder = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    build_model(folder / "model", args.model_size)
    tok = AutoTokenizer.from_pretrained(folder / "model")
    lo, hi = map(int, args.prompt_tokens.split(","))
    prompts = review_prompts(tok, max(64, args.steps * args.prompts_per_step), lo, hi)
    lengths = token_lengths(tok, prompts)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))
    (folder / "mean_prompt_tokens").write_text(json.dumps(sum(lengths) / len(lengths)))
    results = {}
    for variant in args.variants.split(","):
        r = results[variant] = run_variant(__file__, args, variant, folder, skip=("variants", "quick"))
        split = " ".join(f"{k} {v:6.2f}" for k, v in r["split_per_step"].items())
        print(f"{variant:11s} {r['completions_per_s']:7.2f} completions/s  {r['step_s']:6.2f} s/step "
              f"({split})  peak RSS {r['peak_rss_mb']:6.0f} MB  {r['flops_per_s'] / 1e9:6.1f} GFLOP/s"
              + (f"  options {json.dumps(r['options'])}" if r.get("options") else ""), flush=True)
    ours = results.get("alignlab")
    bf16 = next(iter(results.values()))["bf16"]
    peak = highest_peak(bf16, results)
    print(f"model {next(iter(results.values()))['n_params'] / 1e6:.1f}M matmul params ({args.model_size}), "
          f"{args.steps} steps × {args.prompts_per_step} prompts × {args.group_size} completions "
          f"(micro-batches of {micro_batch(args)}), "
          f"prompts {min(lengths)}–{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), "
          f"max {args.max_completion_length} new tokens, {'bf16' if bf16 else 'fp32'}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")
    if ours is None:
        return

    def ratio(variant: str, key: str) -> float:
        return _ratio(ours, results.get(variant), key)

    trl_mem = min((r["peak_rss_mb"] for k, r in results.items() if k.startswith("trl")), default=float("nan"))
    best = json.dumps({**TRL_BEST, **json.loads(args.trl_best)}, separators=(",", ":"))
    fields = {"speedup_vs_trl": f"{ratio('trl_default', 'completions_per_s'):.3f}",
              "speedup_vs_trl_best": f"{ratio('trl_best', 'completions_per_s'):.3f}",
              "mem_ratio_vs_trl": f"{ours['peak_rss_mb'] / trl_mem:.3f}",
              "mfu": f"{ours['flops_per_s'] / peak:.3f}",
              "peak_gflops": f"{peak / 1e9:.1f}",
              "trl_best": best.replace(" ", "")}
    for tag in ("fast", "selective"):  # the other alignlab variants, when run
        other = results.get(f"alignlab_{tag}")
        if other is not None:
            fields.update({
                f"{tag}_speedup_vs_trl": f"{_ratio(other, results.get('trl_default'), 'completions_per_s'):.3f}",
                f"{tag}_speedup_vs_trl_best": f"{_ratio(other, results.get('trl_best'), 'completions_per_s'):.3f}",
                f"{tag}_mem_ratio_vs_trl": f"{other['peak_rss_mb'] / trl_mem:.3f}"})
    for variant, r in results.items():
        for part in PARTS:
            fields[f"{variant}_{part}_s"] = f"{r['split_per_step'][part]:.3f}"
    print(" ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
