"""Cost growth: the step time of DPO and GRPO, alignlab and TRL, as the work grows.

    pip install -e '.[bench]'          # installs trl; this script installs nothing itself
    python benchmarks/scaling_curves.py [--out docs/scaling_curves.png --trl best]
    python benchmarks/scaling_curves.py --quick      # a seconds-long smoke run at toy shapes

Three axes, each varied alone from a base point (group 8, prompts of ~128 tokens, the 13M
model): the group size (GRPO: completions per prompt, 2–32; DPO, whose groups are pairs: pairs
per step, 2–32), the prompt length (32–1024 tokens; prompts of 90–100% of it) and the model size
(3M–100M parameters, ``_assets.MODEL_SIZES``). GRPO runs 2 prompts per step and samples up to 64
new tokens (the random-init models rarely stop early, so nearly every completion is that long);
DPO runs ``group`` pairs per step (8 at the base point) with answers of ~10–30 tokens. Both sides
train the same random-init Llama on the same prompts in the same precision, as in
``grpo_vs_trl.py`` and ``dpo_vs_trl.py`` (whose workers run each point); TRL in its best
measured configuration (``--trl default`` for its defaults).

A point's step time is the median of its steps after the first (a warm-up), plus for DPO the
precomputed reference log-probs spread over the steps (alignlab, and TRL with
``precompute_ref_log_probs``; TRL's defaults compute them inside each step). Each curve's
exponent is the least-squares slope of log(step time) on log(x) (x: group size, prompt tokens,
matmul parameters). One PNG, one panel per axis. Every (algorithm, side) runs in its own
subprocess. The last line is machine-readable: ``<algo>_<side>_<axis>_exp=<slope>`` for the
twelve curves and ``png=<path>``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
from pathlib import Path

from _assets import build_model, review_contexts
from _harness import add_worker_args, report, require_trl, run_variant

FULL = {"base": {"group": 8, "prompt": 128, "model": "13m"},
        "axes": {"group": [2, 4, 8, 16, 32], "prompt": [32, 64, 128, 256, 512, 1024],
                 "model": ["3m", "13m", "44m", "100m"]},
        "steps": 4, "prompts_per_step": 2, "new_tokens": 64}
QUICK = {"base": {"group": 2, "prompt": 16, "model": "64x1"},
         "axes": {"group": [2, 4], "prompt": [16, 32], "model": ["64x1", "128x1"]},
         "steps": 2, "prompts_per_step": 1, "new_tokens": 4}
VARIANTS = ("grpo/alignlab", "grpo/trl", "dpo/alignlab", "dpo/trl")
AXIS_LABEL = {"group": "group size (GRPO: completions per prompt; DPO: pairs per step)",
              "prompt": "prompt tokens", "model": "matmul parameters"}


def points(plan: dict) -> list[dict]:
    """Every distinct point of the plan (the base point once)."""
    out: list[dict] = []
    for axis, values in plan["axes"].items():
        for v in values:
            p = {**plan["base"], axis: v}
            if p not in out:
                out.append(p)
    return out


def key(point: dict) -> str:
    return f"g{point['group']}-p{point['prompt']}-m{point['model']}"


def build(folder: Path, plan: dict) -> dict:
    """Models (one per size) and per point its prompts (GRPO) and preference rows (DPO)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.world import language as lang

    sizes = {p["model"] for p in points(plan)}
    params = {}
    for size in sorted(sizes):
        path = build_model(folder / "models" / size, size)
        model = AutoModelForCausalLM.from_pretrained(path)
        emb = model.get_input_embeddings().weight.numel()
        params[size] = sum(q.numel() for q in model.parameters()) - emb
    tok = AutoTokenizer.from_pretrained(folder / "models" / next(iter(sizes)))
    for point in points(plan):
        d = folder / key(point)
        d.mkdir(parents=True)
        (d / "model").symlink_to(folder / "models" / point["model"])
        lo = max(1, int(0.9 * point["prompt"]))
        n = plan["steps"] * max(plan["prompts_per_step"], point["group"])
        contexts = review_contexts(tok, n, lo, point["prompt"], seed=0)
        (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t, _ in contexts))
        rng = random.Random(1)
        rows = [{"prompt": t, "chosen": lang.complete_review(rng, pre, 1.0),
                 "rejected": lang.complete_review(rng, pre, 0.0)} for t, pre in contexts]
        (d / "rows.json").write_text(json.dumps(rows))
    return params


def step_time(out: dict, steps: int) -> float:
    timed = out["step_seconds"][1:] or out["step_seconds"]
    return statistics.median(timed) + out.get("precomputed_reference_seconds", 0.0) / steps


def worker(variant: str, folder: Path, args: argparse.Namespace) -> dict:
    """Every point of the plan for one (algorithm, side): its step time."""
    import dpo_vs_trl
    import grpo_vs_trl
    import torch

    plan = json.loads((folder / "plan.json").read_text())
    algo, side = variant.split("/")
    results = {}
    for point in points(plan):
        d = folder / key(point)
        torch.manual_seed(0)
        if algo == "grpo":
            ns = argparse.Namespace(steps=plan["steps"], prompts_per_step=plan["prompts_per_step"],
                                    group_size=point["group"], max_completion_length=plan["new_tokens"],
                                    lr=1e-6, trl_best="{}")
            out = (grpo_vs_trl.alignlab_worker(d, ns, False) if side == "alignlab"
                   else grpo_vs_trl.trl_worker(d, ns, False, best=args.trl == "best"))
            out.pop("model")
        else:
            ns = argparse.Namespace(steps=plan["steps"], batch_size=point["group"], lr=1e-6,
                                    max_length=2 * max(plan["axes"]["prompt"]) + 128, precision="fp32")
            name = "alignlab" if side == "alignlab" else f"trl_{args.trl}"
            out = dpo_vs_trl.worker(name, d, ns)
        results[key(point)] = step_time(out, plan["steps"])
        print(f"{variant} {key(point)} {results[key(point)]:.3f} s/step", file=sys.stderr, flush=True)
    return results


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    var = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / var if var else float("nan")


def curves(plan: dict, params: dict, results: dict) -> dict:
    """(variant, axis) → (xs, step times, exponent)."""
    out = {}
    for variant in VARIANTS:
        for axis, values in plan["axes"].items():
            xs = [params[v] if axis == "model" else v for v in values]
            ys = [results[variant][key({**plan["base"], axis: v})] for v in values]
            out[variant, axis] = (xs, ys, slope(xs, ys))
    return out


def plot(found: dict, plan: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = list(plan["axes"])
    fig, axs = plt.subplots(1, len(axes_names), figsize=(5.2 * len(axes_names), 4.4))
    style = {"alignlab": "-", "trl": "--"}
    colour = {"grpo": "tab:blue", "dpo": "tab:orange"}
    for ax, axis in zip(axs, axes_names):
        for variant in VARIANTS:
            algo, side = variant.split("/")
            xs, ys, k = found[variant, axis]
            ax.plot(xs, ys, style[side], marker="o", color=colour[algo],
                    label=f"{algo.upper()} {side}: slope {k:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if axis != "model":  # the measured values as plain ticks, not 3×10⁰
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xticks(plan["axes"][axis])
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(AXIS_LABEL[axis])
        ax.set_ylabel("seconds per step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="the PNG (default docs/scaling_curves.png; --quick: a temp dir)")
    p.add_argument("--trl", choices=["best", "default"], default="best")
    p.add_argument("--quick", action="store_true", help="a smoke run at toy shapes, two points per axis")
    add_worker_args(p)
    args = p.parse_args()
    if args.worker:
        report(worker(args.worker, Path(args.folder), args))
        return
    require_trl()
    plan = QUICK if args.quick else FULL
    folder = Path(tempfile.mkdtemp(prefix="scaling-"))
    (folder / "plan.json").write_text(json.dumps(plan))
    params = build(folder, plan)
    results = {}
    for variant in VARIANTS:
        results[variant] = run_variant(__file__, args, variant, folder, skip=("quick", "out"))
        print(variant, json.dumps({k: round(v, 3) for k, v in results[variant].items()}), flush=True)
    found = curves(plan, params, results)
    out = Path(args.out) if args.out else (folder / "scaling_curves.png" if args.quick
                                           else Path(__file__).resolve().parents[1] / "docs" / "scaling_curves.png")
    base = plan["base"]
    plot(found, plan, out, f"seconds per step (median after a warm-up), fp32 CPU; base: group {base['group']}, "
                           f"~{base['prompt']}-token prompts, {base['model']} model; TRL {args.trl}")
    fields = {f"{v.replace('/', '_')}_{axis}_exp": f"{k:.3f}" for (v, axis), (_, _, k) in found.items()}
    print(" ".join(f"{k}={v}" for k, v in fields.items()) + f" png={out}")


if __name__ == "__main__":
    main()
