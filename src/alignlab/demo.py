"""The demo (README's main job) on the built-in feedback world.

world (built if absent) → evaluate the base model → SFT on the ``positive`` task's
demonstrations → evaluate again → before/after table (stdout, Markdown, JSON) and a PNG plot.
Later stages (preferences, reward model, DPO, online RL) append themselves here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from alignlab.bench.evaluate import comparison_table, evaluate, write_report
from alignlab.bench.plots import plot_before_after
from alignlab.config import DataSection, EvalSection, ModelSection, TrainSection, WorldSection
from alignlab.models.loading import load_model, load_tokenizer
from alignlab.trainers.sft import SFTConfig, run_sft
from alignlab.utils.io import atomic_write_json, atomic_write_text
from alignlab.world.build import ensure_world

# Per preset: SFT steps and eval size. "full" fits the demo's 10-minute budget on 2 cores.
DEMO_SETTINGS = {
    "full": {"sft_steps": 150, "batch_size": 32, "lr": 3e-4, "n_prompts": 128, "samples": 2},
    "tiny": {"sft_steps": 40, "batch_size": 16, "lr": 1e-3, "n_prompts": 32, "samples": 2},
}


def run_demo(preset: str = "full", out: str | Path = "runs/demo", seed: int = 0,
             cache_dir: str | None = None, task: str = "positive", progress: bool = True) -> dict[str, Any]:
    console = Console()
    out = Path(out)
    settings = DEMO_SETTINGS[preset]
    timings: dict[str, float] = {}
    t0 = time.time()
    world = ensure_world(preset, seed, cache_dir, progress=progress)
    timings["world"] = time.time() - t0
    console.print(f"world: {world.path} ({world.manifest['n_parameters']:,} parameters, "
                  f"held-out ppl {world.manifest['heldout_ppl']:.2f} vs unigram "
                  f"{world.manifest['heldout_unigram_ppl']:.1f})")
    eval_cfg = EvalSection(task=task, n_prompts=settings["n_prompts"], samples_per_prompt=settings["samples"])
    heldout = world.corpus("heldout")
    world_cfg = WorldSection(preset=preset, seed=seed, cache_dir=cache_dir)

    t = time.time()
    base = load_model(str(world.base_dir))
    tokenizer = load_tokenizer(str(world.base_dir))
    results = {"base": evaluate(base, tokenizer, world.task(task), eval_cfg, heldout_texts=heldout)}
    write_report(results["base"], out, "eval_base")
    timings["eval_base"] = time.time() - t

    t = time.time()
    sft_cfg = SFTConfig(
        model=ModelSection(name_or_path=str(world.base_dir)),
        data=DataSection(source=f"world:{task}", limit=4096),
        train=TrainSection(output_dir=str(out / "sft"), max_steps=settings["sft_steps"],
                           batch_size=settings["batch_size"], lr=settings["lr"], warmup_steps=10,
                           log_every=5, seed=seed, progress=progress),
        world=world_cfg)
    sft = run_sft(sft_cfg)
    timings["sft"] = time.time() - t

    t = time.time()
    results["sft"] = evaluate(sft.model, sft.tokenizer, world.task(task), eval_cfg, heldout_texts=heldout)
    write_report(results["sft"], out, "eval_sft")
    timings["eval_sft"] = time.time() - t
    timings["total"] = time.time() - t0

    header, rows = comparison_table(results)
    table = Table(title=f"alignlab demo: task '{task}', {preset} world")
    for h in header:
        table.add_column(h, justify="right" if h != "metric" else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    md = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    curves = {"sft loss": [(h["step"], h["loss"]) for h in sft.result.history]}
    plot = plot_before_after(results, curves, out / "demo.png",
                             title=f"alignlab demo ({preset} world, task {task})")
    summary = {"preset": preset, "task": task, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "metrics": {k: v["metrics"] for k, v in results.items()},
               "world": {k: world.manifest[k] for k in ("n_parameters", "build_seconds", "heldout_ppl",
                                                        "heldout_unigram_ppl")}}
    atomic_write_json(out / "summary.json", summary)
    console.print(f"timings (s): {summary['timings_s']}")
    console.print(f"wrote {out / 'summary.md'}, {out / 'summary.json'}, {plot}")
    return summary
