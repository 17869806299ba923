"""Data-parallel scaling: DPO and GRPO throughput with 1 and 2 processes on this machine.

    python benchmarks/scaling.py [--processes 1 2 --dpo-steps 20 --grpo-steps 6 --threads 1]

Each run is started by torch's elastic launcher (``torchrun --standalone``, what ``alignlab
train --num-processes N`` uses) and trains on the tiny world (built once into ``--cache``, by
default a temporary folder) with the same *global* batch for every process count: DPO 16 pairs
per optimizer step, GRPO 8 prompts × 4 completions per iteration (one optimizer step each), so
N processes each do 1/N of the work of every step (``docs/scaling.md``). Every process uses
``--threads`` intra-op threads (default 1, so 2 processes use the 2 cores that 1 process with 2
threads would). Throughput is rank 0's training loop (DPO: pairs/s, the reference log-probs
precomputed before it; GRPO: completions/s, generation included; loading and the final save
excluded). Parallel efficiency = throughput(N) / (N × throughput(1)).

The last line is machine-readable: ``dpo_pairs_per_s_1=… dpo_pairs_per_s_2=… dpo_efficiency_2=…
grpo_completions_per_s_1=… grpo_completions_per_s_2=… grpo_efficiency_2=…``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import RESULT, add_worker_args, peak_rss_mb, report

DPO_PAIRS_PER_STEP = 16
GRPO_PROMPTS, GRPO_N = 8, 4


def worker(variant: str, folder: Path, args: argparse.Namespace) -> dict | None:
    import torch

    from alignlab.core.config import DataSection, RolloutSection, TrainSection, WorldSection
    from alignlab.engine import distributed

    torch.set_num_threads(args.threads)
    world = WorldSection(preset="tiny", cache_dir=str(folder / "cache"))
    # One run directory for all ranks: torchrun gives them one run id.
    out = str(folder / f"{variant}-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    if variant == "dpo":
        from alignlab.algorithms.preference.trainer import (
            PreferenceConfig,
            PreferenceSection,
            run_preference,
        )

        cfg = PreferenceConfig(
            world=world, preference=PreferenceSection(loss="dpo"),
            data=DataSection(source="world:positive", limit=DPO_PAIRS_PER_STEP * args.dpo_steps),
            train=TrainSection(output_dir=out, max_steps=args.dpo_steps, lr=1e-5, device="cpu",
                               precision=args.precision, batch_size=DPO_PAIRS_PER_STEP,
                               progress=False, tensorboard=False, save_every=None,
                               overwrite=True))
        result = run_preference(cfg).result
        units = DPO_PAIRS_PER_STEP * args.dpo_steps
    else:
        from alignlab.algorithms.policy_gradient.config import OnlineRLConfig, RLSection
        from alignlab.algorithms.policy_gradient.run import train_policy_gradient
        from alignlab.core.config import OnlineTrainSection

        cfg = OnlineRLConfig(
            world=world,
            rollout=RolloutSection(prompts="world:positive", prompts_per_step=GRPO_PROMPTS,
                                   n=GRPO_N, max_new_tokens=args.max_new_tokens),
            rl=RLSection(kl_coef=0.0),
            train=OnlineTrainSection(output_dir=out, max_steps=args.grpo_steps, lr=1e-5,
                                     device="cpu", precision=args.precision,
                                     batch_size=GRPO_PROMPTS * GRPO_N, progress=False,
                                     tensorboard=False, save_every=None, overwrite=True))
        result = train_policy_gradient(cfg, "grpo").result
        units = GRPO_PROMPTS * GRPO_N * args.grpo_steps
    processes = distributed.world_size()
    distributed.shutdown()
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return {"variant": variant, "processes": processes, "seconds": result.seconds,
            "units_per_s": units / result.seconds, "peak_rss_mb": peak_rss_mb()}


def run(args: argparse.Namespace, variant: str, processes: int, folder: Path) -> dict:
    """``variant`` in ``processes`` processes (torchrun); rank 0's result."""
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("worker", "folder", "processes")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={processes}", __file__, *passthrough, "--worker", variant,
           "--folder", str(folder)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT)), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{variant} on {processes} processes failed:\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-3000:]}")
    return json.loads(line[len(RESULT):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dpo-steps", type=int, default=20)
    p.add_argument("--grpo-steps", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--cache", help="world cache folder (default: a new temporary one)")
    add_worker_args(p)
    args = p.parse_args()
    if args.worker:
        result = worker(args.worker, Path(args.folder), args)
        if result is not None:
            report(result)
        return
    from alignlab.world.build import ensure_world

    folder = Path(tempfile.mkdtemp(prefix="scaling-bench-"))
    if args.cache:
        (folder / "cache").symlink_to(Path(args.cache).resolve(), target_is_directory=True)
    ensure_world("tiny", 0, str(folder / "cache"), progress=False)
    units = {"dpo": "pairs", "grpo": "completions"}
    summary = []
    for variant in ("dpo", "grpo"):
        rates = {}
        for n in args.processes:
            r = run(args, variant, n, folder)
            rates[n] = r["units_per_s"]
            print(f"{variant:5s} {n} process(es): {r['units_per_s']:8.1f} {units[variant]}/s "
                  f"({r['seconds']:6.1f} s, rank 0 peak RSS {r['peak_rss_mb']:5.0f} MB)",
                  flush=True)
            summary.append(f"{variant}_{units[variant]}_per_s_{n}={rates[n]:.3f}")
        for n in args.processes:
            if n > 1 and 1 in rates:
                summary.append(f"{variant}_efficiency_{n}={rates[n] / (n * rates[1]):.3f}")
    print(f"tiny world, {args.precision}, {args.threads} thread(s) per process; DPO "
          f"{DPO_PAIRS_PER_STEP} pairs × {args.dpo_steps} steps, GRPO {GRPO_PROMPTS} prompts × "
          f"{GRPO_N} completions × {args.grpo_steps} iterations (max {args.max_new_tokens} new "
          "tokens)")
    print(" ".join(summary))


if __name__ == "__main__":
    main()
