"""One job of a suite in its own process: ``python -m alignlab.bench.worker JOB_DIR``.

Reads ``JOB_DIR/job.json`` (written by the runner), writes ``phase`` (what it is doing, for the
progress view), its outputs, and ``DONE`` last. A training run that a killed job left behind is
resumed from its newest checkpoint, or replaced when it has none.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from alignlab.core.io import atomic_write_json, atomic_write_text


def _phase(job_dir: Path, text: str) -> None:
    atomic_write_text(job_dir / "phase", text)


def run_training(job_dir: Path, algorithm: str, config: dict[str, Any]) -> float:
    """Train unless ``train/DONE`` exists; the seconds it took (0 when already done)."""
    from alignlab.algorithms.registry import ALGORITHMS
    from alignlab.core.config import dump_config

    entry = ALGORITHMS.get(algorithm)
    out = Path(config["train"]["output_dir"])
    if (out / "DONE").exists():
        return 0.0
    has_checkpoint = (out / "checkpoints" / "latest").exists()
    config = json.loads(json.dumps(config))
    config["train"]["resume"] = has_checkpoint
    config["train"]["overwrite"] = not has_checkpoint
    cfg = entry.config_cls.model_validate(config)
    atomic_write_text(job_dir / "config.yaml", dump_config(cfg))
    _phase(job_dir, "train")
    t0 = time.time()
    entry.run(cfg)
    return time.time() - t0


def run_preferences(job_dir: Path, spec: dict[str, Any]) -> None:
    from alignlab.algorithms.common import load_policy
    from alignlab.core.config import ModelSection, WorldSection
    from alignlab.engine.preference_data import generate_preferences
    from alignlab.rewards.annotator import SimulatedAnnotator
    from alignlab.world.resolve import get_world

    _phase(job_dir, "preferences")
    world_cfg = WorldSection.model_validate(spec["world"])
    task = get_world(world_cfg).task(spec["task"])
    policy, tokenizer = load_policy(ModelSection(name_or_path=spec["reference"]), world_cfg)
    annotator = SimulatedAnnotator.for_task(task, seed=spec["seed"], **spec["annotator"])
    rows = generate_preferences(policy, tokenizer, task, spec["n"],
                                samples_per_prompt=spec["samples_per_prompt"],
                                annotator=annotator, seed=spec["seed"])
    atomic_write_text(spec["out"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    stats = {k: v for k, v in rows.stats.items() if isinstance(v, (int, float, str, dict))}
    atomic_write_json(job_dir / "stats.json", stats)


def run_cell(job_dir: Path, spec: dict[str, Any]) -> None:
    from alignlab.core.config import WorldSection
    from alignlab.core.runtime import pick_device
    from alignlab.eval.against_reference import evaluate_against_reference
    from alignlab.models.loading import load_reference_model, load_tokenizer
    from alignlab.rewards.annotator import SimulatedAnnotator
    from alignlab.rewards.reward_model import RewardModelScorer
    from alignlab.world.resolve import get_world, resolve_model_path

    t0 = time.time()
    train_seconds = 0.0
    if spec["train"] is not None:
        train_seconds = run_training(job_dir, spec["train"]["algorithm"], spec["train"]["config"])
    else:  # an evaluation-only cell: what it evaluates is its config
        atomic_write_text(job_dir / "config.yaml", yaml.safe_dump(
            {k: spec[k] for k in ("reference", "best_of_n", "proxy", "eval")}, sort_keys=False))
    _phase(job_dir, "eval")
    t_eval = time.time()
    world_cfg = WorldSection.model_validate(spec["world"])
    task = get_world(world_cfg).task(spec["task"])
    ref_path = resolve_model_path(spec["reference"], world_cfg)
    base_path = resolve_model_path(spec["base"], world_cfg)
    device = pick_device("auto")
    reference = load_reference_model(ref_path, device=device)
    tokenizer = load_tokenizer(ref_path)
    if spec["train"] is not None:
        policy = load_reference_model(Path(spec["train"]["config"]["train"]["output_dir"]) / "final",
                                      device=device)
    else:
        policy = reference
    base = reference if base_path == ref_path else load_reference_model(base_path, device=device)
    proxy = None
    if spec["proxy"]:
        proxy = RewardModelScorer.from_pretrained(spec["proxy"], device=str(device))
    ev = spec["eval"]
    annotator = SimulatedAnnotator.for_task(task, seed=spec["seed"], **ev["annotator"])
    bon = spec["best_of_n"]
    bon_reward = None
    if bon is not None and bon["reward"] == "gold":
        bon_reward = task.gold
    elif bon is not None:
        bon_reward = proxy if bon["aggregate"] is None and bon["std_coef"] is None else \
            RewardModelScorer.from_pretrained(spec["proxy"], aggregate=bon["aggregate"],
                                              std_coef=bon["std_coef"], device=str(device))
    result = evaluate_against_reference(
        policy, tokenizer, task, task.eval_prompts[:ev["n_prompts"]], reference=reference,
        base=base, samples_per_prompt=ev["samples_per_prompt"], max_new_tokens=ev["max_new_tokens"],
        batch_size=ev["batch_size"], seed=ev["seed"] + 1000 * spec["seed"], proxy=proxy,
        annotator=annotator, pass_ks=ev["pass_at_k"], best_of_n=bon["n"] if bon else None,
        best_of_n_reward=bon_reward, self_bleu_max_texts=ev["self_bleu_max_texts"])
    result["cell"] = {k: spec[k] for k in ("task", "name", "algorithm", "sweep", "seed")}
    result["budget"] = spec["budget"]
    result["seconds"] = {"train": round(train_seconds, 2), "eval": round(time.time() - t_eval, 2),
                         "total": round(time.time() - t0, 2)}
    atomic_write_json(job_dir / "eval.json", result)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m alignlab.bench.worker JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(args[0])
    spec = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))
    threads = int(os.environ.get("ALIGNLAB_BENCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    kind = spec["kind"]
    if kind == "train":
        run_training(job_dir, spec["algorithm"], spec["config"])
    elif kind == "preferences":
        run_preferences(job_dir, spec)
    elif kind == "cell":
        run_cell(job_dir, spec)
    else:
        print(f"unknown job kind {kind!r}", file=sys.stderr)
        return 2
    _phase(job_dir, "done")
    atomic_write_text(job_dir / "DONE", "done\n")
    return 0


if __name__ == "__main__":
    from alignlab.core.errors import AlignlabError

    try:
        sys.exit(main())
    except AlignlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
