"""GPU smoke test of the vLLM rollout backend: NEEDS A CUDA GPU AND ``pip install 'alignlab[vllm]'``.

On a machine without either it says so and exits with status 2 (nothing is checked on CPU
here; the glue's CPU tests are tests/test_rollout_vllm_backend.py, against a stand-in vllm).

For each case, in a fresh process (vLLM holds the GPU until its process ends):

- ``full``: the policy's weights synced into a colocated ``vllm.LLM``; completions sampled with
  the sampler's log-probs; the trainer recomputes log π(y_t) of the same ids
  (``models.logprobs.token_logprobs`` at the sampling temperature) and the two must agree:
  mean |Δ log p| over completion tokens <= TOL[dtype].mean and at most TOL[dtype].frac of the
  tokens with |Δ| > 0.1. Then the policy is moved (an SGD step's worth of noise), sampled again
  *without* a sync (the mismatch must grow past the tolerance: vLLM kept its weights) and
  *with* one (back within it: the sync took);
- ``lora-merged`` / ``lora-adapter``: the same with LoRA adapters (B ≠ 0) on q/v, synced merged
  (W + BA) or as adapters through a ``LoRARequest``;
- ``grpo-async``: 3 GRPO iterations on the tiny world with ``rollout.backend: vllm`` and
  ``rl.max_staleness: 1`` (the rollout thread drives vLLM); staleness logged [0, 1, 1] and
  the first iteration's |Δ log p| within tolerance.

Tolerances (stated, not tuned on a run yet; the first GPU run's figures go in
benchmarks/README.md): fp32 weights: mean 1e-3, no token past 0.1; bf16: mean 2e-2, <= 2%.

    python benchmarks/vllm_smoke.py [--case all|full|lora-merged|lora-adapter|grpo-async]
        [--model world:base|DIR] [--dtype float32|bfloat16] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

CASES = ("full", "lora-merged", "lora-adapter", "grpo-async")


@dataclass(frozen=True)
class Tolerance:
    mean: float  # mean |Δ log p| over completion tokens
    frac: float  # fraction of tokens with |Δ log p| > 0.1


TOL = {"float32": Tolerance(1e-3, 0.0), "bfloat16": Tolerance(2e-2, 0.02)}


def mismatch(policy: torch.nn.Module, role, prompts: list[str], *, n: int, seed: int,
             temperature: float) -> dict[str, float]:
    """Sample with the role's backend and compare its log-probs with the trainer's."""
    from alignlab.models.logprobs import token_logprobs

    rollouts = role.generate(prompts, n, seed=seed)
    batch = role.to_batch(rollouts)
    device = next(policy.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        trainer = token_logprobs(policy, batch, temperature=temperature).float()
    policy.train(was_training)
    mask = batch["loss_mask"].bool()
    diff = (trainer - batch["rollout_logprobs"].float())[mask].abs()
    return {"tokens": int(mask.sum()), "mean_abs_diff": float(diff.mean()),
            "max_abs_diff": float(diff.max()), "frac_over_0.1": float((diff > 0.1).float().mean())}


def within(stats: dict[str, float], tol: Tolerance) -> bool:
    return stats["mean_abs_diff"] <= tol.mean and stats["frac_over_0.1"] <= tol.frac


def sync_case(policy, tokenizer, section, *, precision: str, dtype: str, prompts: list[str],
              temperature: float = 1.0) -> dict[str, object]:
    """The ``full``/``lora-*`` checks on one policy (any device; the CPU tests use a stand-in)."""
    from alignlab.rollout.role import RolloutRole
    from alignlab.rollout.vllm_backend import VLLMBackend

    backend = VLLMBackend(policy, section, eos_token_id=tokenizer.eos_token_id,
                          train_precision=precision, work_dir=tempfile.mkdtemp())
    role = RolloutRole(policy, tokenizer, max_new_tokens=24, temperature=temperature,
                       backend=backend)
    tol = TOL[dtype]
    role.sync_weights()
    synced = mismatch(policy, role, prompts, n=4, seed=1, temperature=temperature)
    with torch.no_grad():  # an update's worth of change in every trained weight
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05 * (p.float().std() + 1e-3))
    stale = mismatch(policy, role, prompts, n=4, seed=2, temperature=temperature)
    role.sync_weights()
    resynced = mismatch(policy, role, prompts, n=4, seed=3, temperature=temperature)
    ok = within(synced, tol) and not within(stale, tol) and within(resynced, tol)
    return {"ok": ok, "tolerance": vars(tol), "synced": synced, "stale_without_sync": stale,
            "after_sync": resynced}


def _load(args):
    from alignlab.algorithms.common import load_policy
    from alignlab.core.config import LoraSettings, ModelSection, WorldSection

    world = WorldSection(preset="tiny", cache_dir=args.cache_dir)
    lora = (LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
            if args.case.startswith("lora") else None)
    policy, tokenizer = load_policy(ModelSection(name_or_path=args.model, lora=lora,
                                                 dtype=args.dtype), world, seed=0)
    if lora is not None:
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    prompts = ["the food was", "the staff were", "i would say the room", "what is 3 + 4 ?"]
    return policy.cuda(), tokenizer, prompts


def run_case(args) -> dict[str, object]:
    precision = "fp32" if args.dtype == "float32" else "bf16"
    if args.case == "grpo-async":
        return grpo_async(args, precision)
    from alignlab.core.config import VLLMSection

    policy, tokenizer, prompts = _load(args)
    section = VLLMSection(dtype="train", gpu_memory_utilization=0.3, enforce_eager=True,
                          lora_sync="adapter" if args.case == "lora-adapter" else "merged")
    return sync_case(policy, tokenizer, section, precision=precision, dtype=args.dtype,
                     prompts=prompts)


def grpo_async(args, precision: str) -> dict[str, object]:
    from alignlab.algorithms.policy_gradient.config import OnlineRLConfig, RLSection
    from alignlab.algorithms.policy_gradient.run import train_policy_gradient
    from alignlab.core.config import (
        ModelSection,
        OnlineTrainSection,
        RolloutSection,
        VLLMSection,
        WorldSection,
    )

    cfg = OnlineRLConfig(
        model=ModelSection(name_or_path=args.model, dtype=args.dtype),
        world=WorldSection(preset="tiny", cache_dir=args.cache_dir),
        train=OnlineTrainSection(output_dir=tempfile.mkdtemp(), max_steps=3, lr=5e-4,
                                 batch_size=32, precision=precision, progress=False,
                                 tensorboard=False, save_every=None),
        rollout=RolloutSection(prompts="world:positive", prompts_per_step=8, n=4,
                               backend="vllm", vllm=VLLMSection(enforce_eager=True)),
        rl=RLSection(max_staleness=1))
    history = train_policy_gradient(cfg, "grpo").result.history
    tol = TOL[args.dtype]
    first = history[0]["rollout_is/abs_logp_diff_mean"]
    staleness = [h["staleness"] for h in history]
    return {"ok": staleness == [0, 1, 1] and first <= tol.mean, "staleness": staleness,
            "abs_logp_diff_mean": [h["rollout_is/abs_logp_diff_mean"] for h in history],
            "rollout_is/weight_mean": [h["rollout_is/weight_mean"] for h in history],
            "reward_mean": [h["reward_mean"] for h in history]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("all", *CASES), default="all")
    ap.add_argument("--model", default="world:base", help="world:base or a local HF directory")
    ap.add_argument("--dtype", choices=tuple(TOL), default="float32")
    ap.add_argument("--cache-dir", default=None, help="the world's cache ($ALIGNLAB_CACHE)")
    args = ap.parse_args(argv)
    missing = [why for why, bad in (("no CUDA GPU is visible", not torch.cuda.is_available()),
                                    ("vllm is not installed (pip install 'alignlab[vllm]')",
                                     importlib.util.find_spec("vllm") is None)) if bad]
    if missing:
        print(f"vllm_smoke needs a CUDA GPU and vLLM: {'; '.join(missing)}. Nothing checked.")
        return 2
    if args.case != "all":
        result = run_case(args)
        print(json.dumps({"case": args.case, "dtype": args.dtype, **result}))
        return 0 if result["ok"] else 1
    failed = []
    for case in CASES:  # each in its own process: vLLM keeps the GPU until its process ends
        cmd = [sys.executable, __file__, "--case", case, "--model", args.model, "--dtype",
               args.dtype, *(["--cache-dir", args.cache_dir] if args.cache_dir else [])]
        code = subprocess.call(cmd)
        if code != 0:
            failed.append(f"{case} (exit {code})")
    print(f"vllm_smoke: {len(CASES) - len(failed)}/{len(CASES)} cases passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
