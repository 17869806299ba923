"""Online vs offline DPO at equal labels and matched KL (issue 12; Tang et al. 2024,
"Understanding the performance gap between online and offline alignment algorithms").

Both methods start from the world's base model, get the same number of preference labels from
the same simulated annotator (gold = the task's VADER reward, Bradley-Terry noise at
temperature 1, a flip rate), take the same number of optimizer steps on them (each label seen
once, 16 pairs a step) and use the same paired loss (DPO's sigmoid) at each β of a sweep:

- **offline**: the base model samples 2 completions per train prompt, the annotator labels
  ``--labels`` pairs once (``engine/preference_data.py``), DPO trains on them;
- **online**: online DPO samples pairs from the *current* policy, and the same annotator labels
  them, ``judge.max_labels = --labels`` in all.

Each run is evaluated against the base model on the task's held-out eval prompts
(``eval/against_reference.py``): gold reward, gold win rate (Bradley-Terry) and the
Monte-Carlo KL(π ‖ π_base) (mean over samples of Σ log π − log π_base). With ≥ 3 seeds the
table shows means and 95% t-intervals; the β sweep gives each method a gold-vs-KL frontier, and
the comparison at *matched KL* interpolates both frontiers linearly at the KL values both
cover. The paper reports online ahead; this script prints what it measures either way.

    python benchmarks/online_vs_offline.py                       # tiny world, 3 seeds, 3 betas
    python benchmarks/online_vs_offline.py --preset full --labels 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PAIRS_PER_STEP = 16


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "full"])
    p.add_argument("--task", default="positive")
    p.add_argument("--labels", type=int, default=256, help="preference labels per run")
    p.add_argument("--betas", default="0.05,0.1,0.3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--flip-rate", type=float, default=0.1)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="runs/online_vs_offline")
    return p.parse_args()


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


def t_interval(values: list[float]) -> tuple[float, float]:
    from alignlab.eval.intervals import t_interval as interval

    ci = interval(values)
    return ci.mean, ci.half_width


def frontier_at(points: list[tuple[float, float]], kl: float) -> float:
    """Gold at ``kl`` on the piecewise-linear frontier through ``points`` (sorted by KL)."""
    pts = sorted(points)
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return g0 if k1 == k0 else g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    raise ValueError(f"KL {kl} outside the frontier {pts}")


def main() -> None:
    args = parse()
    import torch
    from transformers.utils import logging as hf_logging

    from alignlab.eval.against_reference import evaluate_against_reference
    from alignlab.models.loading import load_model, load_tokenizer
    from alignlab.world.build import ensure_world

    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    betas = [float(b) for b in args.betas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    world = ensure_world(args.preset, seed=0, cache_dir=args.cache_dir, progress=False)
    task = world.task(args.task)
    base = load_model(str(world.base_dir)).eval()
    tok = load_tokenizer(str(world.base_dir))
    prompts = task.eval_prompts[:args.eval_prompts]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    t_start = time.time()
    for seed in seeds:
        for beta in betas:
            for method in ("offline", "online"):
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.time()
                    if method == "offline":
                        model, labels = offline_run(world, task, base, tok, args, beta, seed,
                                                    Path(tmp))
                    else:
                        model, labels = online_run(world, args, beta, seed, Path(tmp))
                    m = evaluate_against_reference(model.eval(), tok, task, prompts,
                                                   reference=base, samples_per_prompt=2,
                                                   seed=1000 + seed)["metrics"]
                row = {"method": method, "beta": beta, "seed": seed, "labels": labels,
                       "gold": m["gold_mean"], "kl": m["kl_to_ref"],
                       "win_rate_gold": m["win_rate_gold"], "seconds": time.time() - t0}
                results.append(row)
                print(json.dumps(row), flush=True)
    base_gold = statistics.fmean(r for r in task.gold(*_base_samples(base, tok, prompts)))
    report(results, base_gold, betas, out, time.time() - t_start)


def _base_samples(base, tok, prompts) -> tuple[list[str], list[str]]:
    from alignlab.rollout.sampling import sample

    s = sample(base, tok, prompts, n=2, seed=1000)
    return s.prompts, s.completions


def report(results: list[dict[str, Any]], base_gold: float, betas: list[float], out: Path,
           seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| method | β | labels | gold | KL to base | gold win rate |", "|---|---|---|---|---|---|"]
    frontier: dict[str, list[tuple[float, float]]] = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ("offline", "online"):
        pts = []
        for beta in betas:
            rows = [r for r in results if r["method"] == method and r["beta"] == beta]
            g, gh = t_interval([r["gold"] for r in rows])
            k, kh = t_interval([r["kl"] for r in rows])
            w, wh = t_interval([r["win_rate_gold"] for r in rows])
            labels = statistics.fmean(r["labels"] for r in rows)
            lines.append(f"| {method} | {beta} | {labels:.0f} | {g:.3f} ± {gh:.3f} | "
                         f"{k:.2f} ± {kh:.2f} | {w:.3f} ± {wh:.3f} |")
            pts.append((k, g))
            ax.errorbar(k, g, xerr=kh, yerr=gh, fmt="o", color="C0" if method == "offline" else "C1")
        frontier[method] = sorted(pts)
        ax.plot(*zip(*frontier[method]), "-", color="C0" if method == "offline" else "C1",
                label=method)
    ax.axhline(base_gold, color="grey", ls=":", label="base model")
    ax.set_xlabel("KL(π ‖ π_base), nats (Monte-Carlo)")
    ax.set_ylabel("gold reward (VADER)")
    ax.set_title("Online vs offline DPO at equal labels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "online_vs_offline.png", dpi=120)
    lo = max(frontier["offline"][0][0], frontier["online"][0][0])
    hi = min(frontier["offline"][-1][0], frontier["online"][-1][0])
    if lo <= hi:
        kls = [lo + (hi - lo) * i / 4 for i in range(5)]
        diffs = [frontier_at(frontier["online"], k) - frontier_at(frontier["offline"], k)
                 for k in kls]
        matched = (f"at matched KL ({lo:.2f}–{hi:.2f} nats, 5 points) online − offline gold: "
                   + ", ".join(f"{d:+.3f}" for d in diffs))
        mean_diff = statistics.fmean(diffs)
    else:
        matched, mean_diff = "the two frontiers cover no common KL range", float("nan")
    text = "\n".join([f"base model gold {base_gold:.3f}", *lines, matched,
                      f"total {seconds / 60:.1f} min"])
    (out / "online_vs_offline.md").write_text(text + "\n", encoding="utf-8")
    (out / "online_vs_offline.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(text)
    print(f"online_minus_offline_gold_at_matched_kl={mean_diff:.4f} "
          f"kl_overlap_low={lo:.3f} kl_overlap_high={hi:.3f} seconds={seconds:.0f}")


if __name__ == "__main__":
    main()
