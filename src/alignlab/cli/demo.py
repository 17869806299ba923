"""The demo (README's main job): the feedback pipeline on the built-in world.

world (built if absent) → SFT on the task's demonstrations → sample pairs from the SFT model →
simulated annotator labels them (25% flips) → reward model (held-out accuracy) → DPO from the
SFT model → online GRPO from the SFT model on the gold reward → eval of base / SFT / DPO / GRPO
on held-out prompts: gold reward, KL to the SFT model, perplexity, length, diversity. Prints the
table, writes Markdown/JSON and a PNG plot.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from alignlab.algorithms.policy_gradient.config import OnlineRLConfig, RLSection
from alignlab.algorithms.policy_gradient.run import train_policy_gradient
from alignlab.algorithms.preference.trainer import (
    PreferenceConfig,
    PreferenceSection,
    run_preference,
)
from alignlab.algorithms.reward_model.trainer import RewardConfig, RewardSection, run_reward
from alignlab.algorithms.sft import SFTConfig, run_sft
from alignlab.core.config import (
    DataSection,
    EvalSection,
    ModelSection,
    OnlineTrainSection,
    RolloutSection,
    TrainSection,
    WorldSection,
)
from alignlab.core.io import atomic_write_json, atomic_write_text
from alignlab.engine.preference_data import generate_preferences
from alignlab.eval.evaluate import comparison_table, evaluate, write_report
from alignlab.eval.plots import plot_before_after
from alignlab.eval.preference_bench import sample_kl
from alignlab.models.loading import load_model, load_reference_model, load_tokenizer
from alignlab.rewards.annotator import SimulatedAnnotator
from alignlab.rewards.reward_model import reward_model
from alignlab.rollout.sampling import sample
from alignlab.world.build import ensure_world

# Per preset: step counts and sizes. "full" fits the demo's 10-minute budget on 2 cores. DPO's lr:
# on the full world lr 2e-5 left the SFT model in place (KL 0.02 nats after 40 steps of 16 pairs;
# lr 1e-4: KL 0.6, gold +0.12); on the tiny one lr 1e-4 moved gold +0.01 at seed 0, 3e-4 +0.09.
DEMO_SETTINGS = {
    "full": {"sft_steps": 100, "sft_batch": 32, "sft_lr": 3e-4, "n_pairs": 1024, "rm_steps": 80, "rm_lr": 3e-4,
             "dpo_steps": 80, "dpo_batch": 16, "dpo_lr": 1e-4, "beta": 0.1, "n_prompts": 128, "samples": 2,
             "rl_steps": 20, "rl_lr": 5e-5},
    "tiny": {"sft_steps": 40, "sft_batch": 16, "sft_lr": 1e-3, "n_pairs": 256, "rm_steps": 30, "rm_lr": 1e-3,
             "dpo_steps": 30, "dpo_batch": 16, "dpo_lr": 3e-4, "beta": 0.1, "n_prompts": 64, "samples": 4,
             "rl_steps": 10, "rl_lr": 5e-4},
}


def _train_section(out: Path, name: str, steps: int, batch: int, lr: float, seed: int, progress: bool) -> TrainSection:
    return TrainSection(output_dir=str(out / name), max_steps=steps, batch_size=batch, lr=lr,
                        warmup_steps=min(10, steps // 5), log_every=5, seed=seed, progress=progress,
                        overwrite=True)  # the demo is re-run in place: each run replaces the last


def reward_model_gold_agreement(model, tokenizer, task, rm_path: Path, n_prompts: int,
                                 seed: int, n: int = 4) -> tuple[float, int]:
    """How often the reward model at ``rm_path`` orders two of ``model``'s fresh samples (``n``
    per held-out eval prompt, every pair of a prompt's samples) as the gold reward does, over
    the pairs whose gold differs; and that pair count. Unlike the held-out accuracy on the
    annotator's labels (25% of them flipped, so its ceiling is about 0.75, and a few dozen pairs
    make it noisy), this measures the reward model against the truth."""
    prompts = task.eval_prompts[:n_prompts]
    s = sample(model, tokenizer, prompts, n=n, max_new_tokens=task.max_new_tokens, seed=seed + 1)
    gold = task.gold(s.prompts, s.completions)
    proxy = reward_model(s.prompts, s.completions, path=str(rm_path))
    decided = [(gold[i] - gold[j], proxy[i] - proxy[j])
               for lo in range(0, len(gold), n) for i in range(lo, lo + n)
               for j in range(i + 1, lo + n) if gold[i] != gold[j]]
    return sum((g > 0) == (r > 0) for g, r in decided) / max(len(decided), 1), len(decided)


def run_demo(preset: str = "full", out: str | Path = "runs/demo", seed: int = 0,
             cache_dir: str | None = None, task: str = "positive", progress: bool = True) -> dict[str, Any]:
    console = Console()
    out = Path(out)
    s = DEMO_SETTINGS[preset]
    timings: dict[str, float] = {}
    clock = [time.time()]

    def lap(name: str) -> None:
        now = time.time()
        timings[name] = round(now - clock[0], 1)
        clock[0] = now

    t0 = time.time()
    world = ensure_world(preset, seed, cache_dir, progress=progress)
    world_cfg = WorldSection(preset=preset, seed=seed, cache_dir=cache_dir)
    the_task = world.task(task)
    lap("world")
    console.print(f"world: {world.path} ({world.manifest['n_parameters']:,} parameters, held-out ppl "
                  f"{world.manifest['heldout_ppl']:.2f} vs unigram {world.manifest['heldout_unigram_ppl']:.1f})")
    eval_cfg = EvalSection(task=task, n_prompts=s["n_prompts"], samples_per_prompt=s["samples"])
    heldout = world.corpus("heldout")
    tokenizer = load_tokenizer(str(world.base_dir))

    def run_eval(name: str, model) -> dict[str, Any]:
        result = evaluate(model, tokenizer, the_task, eval_cfg, heldout_texts=heldout)
        write_report(result, out, f"eval_{name}")
        return result

    results = {"base": run_eval("base", load_model(str(world.base_dir)))}
    lap("eval_base")

    sft = run_sft(SFTConfig(model=ModelSection(name_or_path=str(world.base_dir)),
                            data=DataSection(source=f"world:{task}", limit=4096), world=world_cfg,
                            train=_train_section(out, "sft", s["sft_steps"], s["sft_batch"], s["sft_lr"], seed, progress)))
    sft_dir = sft.result.output_dir / "final"
    results["sft"] = run_eval("sft", sft.model)
    lap("sft")

    annotator = SimulatedAnnotator.for_task(the_task, flip_rate=0.25, seed=seed,
                                            cache_path=out / "annotator_labels.jsonl")
    rows = generate_preferences(sft.model, tokenizer, the_task, s["n_pairs"], annotator=annotator, seed=seed)
    prefs_path = out / "preferences.jsonl"
    atomic_write_text(prefs_path, "".join(json.dumps(r) + "\n" for r in rows))
    lap("preferences")

    rm = run_reward(RewardConfig(model=ModelSection(name_or_path=str(sft_dir)),
                                 data=DataSection(source=str(prefs_path), format="preference"), world=world_cfg,
                                 train=_train_section(out, "reward", s["rm_steps"], 16, s["rm_lr"], seed, progress),
                                 reward=RewardSection(eval_fraction=0.2)))
    rm_gold, rm_gold_pairs = reward_model_gold_agreement(
        sft.model, tokenizer, the_task, out / "reward" / "final", s["n_prompts"], seed)
    lap("reward_model")

    dpo = run_preference(PreferenceConfig(
        model=ModelSection(name_or_path=str(sft_dir)), world=world_cfg,
        data=DataSection(source=str(prefs_path), format="preference"),
        train=_train_section(out, "dpo", s["dpo_steps"], s["dpo_batch"], s["dpo_lr"], seed, progress),
        preference=PreferenceSection(loss="dpo", beta=s["beta"])))
    results["dpo"] = run_eval("dpo", dpo.model)
    lap("dpo")

    grpo = train_policy_gradient(OnlineRLConfig(
        model=ModelSection(name_or_path=str(sft_dir)), world=world_cfg,
        train=OnlineTrainSection(output_dir=str(out / "grpo"), max_steps=s["rl_steps"], lr=s["rl_lr"],
                             batch_size=32, seed=seed, progress=progress, overwrite=True),
        rollout=RolloutSection(prompts=f"world:{task}", prompts_per_step=8, n=4),
        rl=RLSection(reward="gold", kl_coef=0.04, kl_estimator="k3", kl_in="loss",
                     loss_aggregation="dapo", clip_eps_high=0.28, dynamic_sampling=True)), "grpo")
    results["grpo"] = run_eval("grpo", grpo.model)
    lap("grpo")

    sft_ref = load_reference_model(str(sft_dir))
    for name, model in (("sft", sft.model), ("dpo", dpo.model), ("grpo", grpo.model)):
        results[name]["metrics"]["kl_to_sft"] = sample_kl(
            model, sft_ref, tokenizer, the_task.eval_prompts[:s["n_prompts"]],
            max_new_tokens=the_task.max_new_tokens, seed=seed)
    timings["total"] = round(time.time() - t0, 1)

    header, table_rows = comparison_table(results)
    table = Table(title=f"alignlab demo: task '{task}', {preset} world")
    for h in header:
        table.add_column(h, justify="left" if h == "metric" else "right")
    for row in table_rows:
        table.add_row(*row)
    console.print(table)
    pipeline = {
        "preference_pairs": len(rows),
        "annotator_agreement_with_gold": rows.stats["annotator"].get("agreement"),
        "gold_chosen_mean": rows.stats.get("gold_chosen_mean"),
        "gold_rejected_mean": rows.stats.get("gold_rejected_mean"),
        "reward_model_heldout_accuracy": rm.metrics.get("accuracy"),
        "reward_model_gold_agreement": rm_gold,
        "reward_model_gold_pairs": rm_gold_pairs,
        "reward_model_ece": rm.metrics.get("ece"),
    }
    console.print("pipeline: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in pipeline.items()))
    md = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in table_rows]
    md += ["", *(f"- {k}: {v}" for k, v in pipeline.items())]
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    curves = {"sft loss": [(h["step"], h["loss"]) for h in sft.result.history],
              "reward-model loss": [(h["step"], h["loss"]) for h in rm.result.history],
              "dpo loss": [(h["step"], h["loss"]) for h in dpo.result.history],
              "grpo reward": [(h["step"], h["reward_mean"]) for h in grpo.result.history if "reward_mean" in h]}
    plot = plot_before_after(results, curves, out / "demo.png",
                             metrics=("gold_mean", "kl_to_sft", "distinct_2"),
                             title=f"alignlab demo ({preset} world, task {task}): base → SFT → DPO / GRPO")
    summary = {"preset": preset, "task": task, "timings_s": timings, "pipeline": pipeline,
               "metrics": {k: v["metrics"] for k, v in results.items()},
               "world": {k: world.manifest[k] for k in ("n_parameters", "build_seconds", "heldout_ppl",
                                                        "heldout_unigram_ppl")}}
    atomic_write_json(out / "summary.json", summary)
    console.print(f"timings (s): {timings}")
    console.print(f"wrote {out / 'summary.md'}, {out / 'summary.json'}, {plot}")
    return summary
