"""Online vs offline DPO at equal labels and matched KL (issue 12; Tang et al. 2024,
"Understanding the performance gap between online and offline alignment algorithms").

Both methods start from the world's base model, get the same number of preference labels from
the same simulated annotator (gold = the task's VADER reward, Bradley-Terry noise at
temperature 1, a flip rate), take the same number of optimizer steps on them (each label seen
once, 16 pairs a step) and use the same paired loss (DPO's sigmoid) at each β of a sweep, one
sweep per method (``--offline-betas``, ``--online-betas``; ``--betas`` sets both): at equal
labels, steps and lr the same β takes the two very different distances from the base, and
their gold-vs-KL frontiers only meet when each gets its own range:

- **offline**: the base model samples 2 completions per train prompt, the annotator labels
  ``--labels`` pairs once (``engine/preference_data.py``), DPO trains on them;
- **online**: online DPO samples pairs from the *current* policy, and the same annotator labels
  them, ``judge.max_labels = --labels`` in all.

Each run is evaluated against the base model on the task's held-out eval prompts
(``eval/against_reference.py``): gold reward, gold win rate (Bradley-Terry) and the
Monte-Carlo KL(π ‖ π_base) (mean over samples of Σ log π − log π_base). With ≥ 3 seeds the
table shows means and 95% t-intervals; the β sweep gives each method a gold-vs-KL frontier, and
the comparison at *matched KL* interpolates both frontiers linearly at the KL values both
cover, on the mean frontiers and seed by seed (``_matched_kl.py`` says how). The paper reports
online ahead; this script prints what it measures either way. Each run's row is appended to
``OUT/rows.jsonl`` as it ends; ``--resume`` reuses the rows run with the same settings.

    python benchmarks/online_vs_offline.py --plot docs/online_vs_offline.png  # tiny, 10 seeds
    python benchmarks/online_vs_offline.py --seeds 0,1,2 --betas 0.05,0.1,0.3   # the old sweep
    python benchmarks/online_vs_offline.py --preset full --labels 1024
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

PAIRS_PER_STEP = 16
METHODS = ("offline", "online")
# The same β moves the two methods very different distances from the base at this budget
# (offline KL 8-15 nats at β 0.05-0.3, online 3-6), so each method gets its own sweep chosen
# for the two gold-vs-KL frontiers to cover a common KL range on the tiny world.
DEFAULT_BETAS = {"offline": "0.03,0.1,1", "online": "0.01,0.03,0.1"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "full"])
    p.add_argument("--task", default="positive")
    p.add_argument("--labels", type=int, default=256, help="preference labels per run")
    p.add_argument("--betas", default=None,
                   help="one β sweep for both methods (overrides the two defaults below)")
    p.add_argument("--offline-betas", default=None,
                   help=f"offline DPO's β sweep (default {DEFAULT_BETAS['offline']})")
    p.add_argument("--online-betas", default=None,
                   help=f"online DPO's β sweep (default {DEFAULT_BETAS['online']})")
    # 3 seeds resolve nothing here (online DPO's KL varies 3-17 nats across seeds at one β)
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--flip-rate", type=float, default=0.1)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=4, help="samples per eval prompt")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="runs/online_vs_offline")
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs already in OUT/rows.jsonl that match these settings")
    p.add_argument("--plot", default=None, help="also write the PNG here (e.g. docs/...)")
    return p.parse_args(argv)


def beta_sweeps(args: argparse.Namespace) -> dict[str, list[float]]:
    """Each method's β sweep: its own flag, else ``--betas`` for both, else its default."""
    def floats(text: str) -> list[float]:
        return [float(b) for b in text.split(",") if b.strip()]

    return {m: floats(getattr(args, f"{m}_betas") or args.betas or DEFAULT_BETAS[m])
            for m in METHODS}


def annotator_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": 1.0, "flip_rate": args.flip_rate, "length_bias": 0.0}


def offline_run(world, task, base, tok, args, beta: float, seed: int, out: Path) -> Any:
    from alignlab.algorithms.preference.trainer import PreferenceConfig, run_preference
    from alignlab.core.config import load_config
    from alignlab.core.io import atomic_write_text
    from alignlab.engine.preference_data import generate_preferences
    from alignlab.rewards.annotator import SimulatedAnnotator

    annotator = SimulatedAnnotator.for_task(task, seed=seed, **annotator_settings(args))
    rows = generate_preferences(base, tok, task, args.labels, samples_per_prompt=2,
                                annotator=annotator, seed=seed)
    data = out / "pairs.jsonl"
    atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(PreferenceConfig, None, [
        f"world.preset={args.preset}", f"world.cache_dir={world.path.parent}",
        f"data.source={data}", "data.max_length=128", f"train.output_dir={out / 'run'}",
        f"train.max_steps={max(1, len(rows) // PAIRS_PER_STEP)}",
        f"train.batch_size={PAIRS_PER_STEP}", f"train.lr={args.lr}", "train.lr_scheduler=constant",
        f"train.seed={seed}", "train.progress=false", "train.tensorboard=false",
        "train.save_every=null", "preference.loss=dpo", f"preference.beta={beta}",
        "preference.heldout=0"])
    return run_preference(cfg).model, len(rows)


def online_run(world, args, beta: float, seed: int, out: Path) -> Any:
    from alignlab.algorithms.online_preference.online_dpo import (
        OnlineDPOConfig,
        train_online_dpo,
    )
    from alignlab.core.config import load_config

    ann = annotator_settings(args)
    cfg = load_config(OnlineDPOConfig, None, [
        f"world.preset={args.preset}", f"world.cache_dir={world.path.parent}",
        f"rollout.prompts=world:{args.task}", f"rollout.prompts_per_step={PAIRS_PER_STEP}",
        "rollout.n=2", f"train.output_dir={out / 'run'}",
        # a few iterations more than the budget needs: ties and identical pairs cost no label
        f"train.max_steps={args.labels // PAIRS_PER_STEP + 4}",
        f"train.batch_size={PAIRS_PER_STEP}", f"train.lr={args.lr}", f"train.seed={seed}",
        "train.progress=false", "train.tensorboard=false", "train.save_every=null",
        "online_dpo.loss=sigmoid", f"online_dpo.beta={beta}", "online_dpo.judge.kind=annotator",
        "online_dpo.judge.reward=gold", f"online_dpo.judge.temperature={ann['temperature']}",
        f"online_dpo.judge.flip_rate={ann['flip_rate']}",
        f"online_dpo.judge.max_labels={args.labels}",
        # the comparison evaluates both runs itself; no per-iteration win rates (extra samples)
        "online_dpo.win_rate_every=0"])
    run = train_online_dpo(cfg)
    labels = int(run.result.history[-1].get("labels_used", run.result.history[-1]["labels_total"]))
    return run.model, labels


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a run's result depends on besides (method, β, seed): a resumed row must match."""
    return {k: getattr(args, k) for k in ("preset", "task", "labels", "lr", "flip_rate",
                                          "eval_prompts", "eval_samples")}


def previous_rows(path: Path, current: dict[str, Any]) -> dict[tuple[str, float, int], dict]:
    """The rows of ``path`` run with ``current`` settings, by (method, β, seed)."""
    rows = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.pop("settings", None) == current:
                rows[(row["method"], row["beta"], row["seed"])] = row
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from alignlab.eval.against_reference import evaluate_against_reference
    from alignlab.models.loading import load_model, load_tokenizer
    from alignlab.world.build import ensure_world

    hf_logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    betas = beta_sweeps(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    world = ensure_world(args.preset, seed=0, cache_dir=args.cache_dir, progress=False)
    task = world.task(args.task)
    base = load_model(str(world.base_dir)).eval()
    tok = load_tokenizer(str(world.base_dir))
    prompts = task.eval_prompts[:args.eval_prompts]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = previous_rows(out / "rows.jsonl", settings(args)) if args.resume else {}
    if not args.resume:
        (out / "rows.jsonl").write_text("", encoding="utf-8")
    results: list[dict[str, Any]] = []
    t_start = time.time()
    for seed in seeds:
        for method in METHODS:
            for beta in betas[method]:
                if (method, beta, seed) in done:
                    results.append(done[(method, beta, seed)])
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.time()
                    if method == "offline":
                        model, labels = offline_run(world, task, base, tok, args, beta, seed,
                                                    Path(tmp))
                    else:
                        model, labels = online_run(world, args, beta, seed, Path(tmp))
                    m = evaluate_against_reference(model.eval(), tok, task, prompts,
                                                   reference=base,
                                                   samples_per_prompt=args.eval_samples,
                                                   seed=1000 + seed)["metrics"]
                row = {"method": method, "beta": beta, "seed": seed, "labels": labels,
                       "gold": m["gold_mean"], "kl": m["kl_to_ref"],
                       "win_rate_gold": m["win_rate_gold"], "kl_stderr": m["kl_stderr"],
                       "gold_stderr": m["gold_std"] / math.sqrt(len(prompts) * args.eval_samples),
                       "seconds": time.time() - t0}
                results.append(row)
                with open(out / "rows.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({**row, "settings": settings(args)}) + "\n")
                print(json.dumps(row), flush=True)
    base_gold = statistics.fmean(r for r in task.gold(*_base_samples(base, tok, prompts,
                                                                           args.eval_samples)))
    print(f"this invocation: {(time.time() - t_start) / 60:.1f} min", flush=True)
    # the runs' own times, so that a resumed report still counts every run
    report(results, base_gold, args, out, sum(r["seconds"] for r in results))


def _base_samples(base, tok, prompts, n: int) -> tuple[list[str], list[str]]:
    from alignlab.rollout.sampling import sample

    s = sample(base, tok, prompts, n=n, seed=1000)
    return s.prompts, s.completions


def report(results: list[dict[str, Any]], base_gold: float, args: argparse.Namespace,
           out: Path, seconds: float) -> None:
    from _matched_kl import matched_kl, matched_table, method_table, plot, summary_line, verdict

    mk = matched_kl(results)
    seeds = sorted({r["seed"] for r in results})
    plot(results, mk, base_gold,
         [out / "online_vs_offline.png", *([Path(args.plot)] if args.plot else [])])
    text = "\n".join([
        f"{args.preset} world, task {args.task}, {args.labels} labels per run, lr {args.lr}, "
        f"seeds {','.join(map(str, seeds))}, eval {args.eval_prompts} prompts × "
        f"{args.eval_samples} samples; base model gold {base_gold:.3f}", "",
        *method_table(results), "", "Matched KL:", "", *matched_table(mk), "", verdict(mk),
        f"all runs: {seconds / 60:.1f} min (sum of each run's training + evaluation)"])
    (out / "online_vs_offline.md").write_text(text + "\n", encoding="utf-8")
    (out / "online_vs_offline.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(text)
    print(summary_line(mk, seconds))


if __name__ == "__main__":
    main()
