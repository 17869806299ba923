"""``alignlab data``: make datasets from a model and a task (simulated preference labels)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from alignlab.core.errors import ConfigError

data_app = typer.Typer(help="Make feedback datasets from a model and a world task.", no_args_is_help=True)
console = Console()


@data_app.callback()
def _group() -> None:
    """Keeps ``data`` a command group even while ``preferences`` is its only command."""


@data_app.command("preferences")
def preferences(
    task: Annotated[str, typer.Option(help="World task (see `alignlab list tasks`).")] = "positive",
    n: Annotated[int, typer.Option(help="Rows to write.")] = 2000,
    out: Annotated[Path, typer.Option(help="Output JSONL file.")] = Path("data/preferences.jsonl"),
    model: Annotated[str, typer.Option(help="Policy that samples: a directory, Hub name, or world:base.")] = "world:base",
    preset: Annotated[str, typer.Option(help="World preset: full or tiny.")] = "full",
    world_seed: Annotated[int, typer.Option(help="World seed.")] = 0,
    cache_dir: Annotated[Optional[str], typer.Option(help="Cache folder (default $ALIGNLAB_CACHE or ~/.cache/alignlab).")] = None,
    format: Annotated[str, typer.Option(help="preference, unpaired or ranked.")] = "preference",
    samples_per_prompt: Annotated[int, typer.Option(help="Completions sampled per prompt.")] = 2,
    flip_rate: Annotated[float, typer.Option(help="Probability that the annotator flips a label.")] = 0.25,
    length_bias: Annotated[float, typer.Option(help="Annotator's bonus per word, in gold units.")] = 0.0,
    label_temperature: Annotated[float, typer.Option(help="Bradley-Terry temperature of the annotator (0: argmax).")] = 0.05,
    tie_margin: Annotated[Optional[float], typer.Option(help="Record pairs whose gold differs by at most this as ties.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Unpaired: gold above this is desirable (default: median).")] = None,
    margin: Annotated[bool, typer.Option(help="Write margin = gold(chosen) - gold(rejected).")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Default: the task's own.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of sampling and labelling.")] = 0,
    rso: Annotated[bool, typer.Option(help="Build pairs by statistical rejection sampling on gold (RSO).")] = False,
    rso_beta: Annotated[float, typer.Option(help="RSO temperature β.")] = 0.5,
    n_candidates: Annotated[int, typer.Option(help="RSO: candidates sampled per prompt.")] = 8,
    label_cache: Annotated[Optional[Path], typer.Option(help="Annotator label cache (default <cache>/annotator/labels.jsonl).")] = None,
) -> None:
    """Sample completions on a task's train prompts and label them with a simulated annotator."""
    from alignlab.algorithms.common import load_policy
    from alignlab.core.config import ModelSection, WorldSection
    from alignlab.core.io import atomic_write_json, atomic_write_text
    from alignlab.core.runtime import default_cache_dir, pick_device
    from alignlab.data.loading import load_rows
    from alignlab.engine.preference_data import GEN_FORMATS, generate_preferences, rso_pairs
    from alignlab.rewards.annotator import SimulatedAnnotator
    from alignlab.world.resolve import get_world

    if format not in GEN_FORMATS:
        raise ConfigError(f"--format: got {format!r}; allowed values: {', '.join(GEN_FORMATS)}")
    if rso and format != "preference":
        raise ConfigError(f"--rso builds preference pairs; got --format {format}")
    world_cfg = WorldSection(preset=preset, seed=world_seed, cache_dir=cache_dir)
    world = get_world(world_cfg)
    world_task = world.task(task)
    policy, tokenizer = load_policy(ModelSection(name_or_path=model), world_cfg)
    policy.to(pick_device("auto"))
    sampling = dict(seed=seed, margin=margin, temperature=temperature, max_new_tokens=max_new_tokens)
    if rso:
        rows = rso_pairs(policy, tokenizer, world_task, n, n_candidates=n_candidates,
                         n_accept=min(4, n_candidates), beta=rso_beta, **sampling)
    else:
        cache = label_cache or Path(cache_dir or default_cache_dir()) / "annotator" / "labels.jsonl"
        annotator = SimulatedAnnotator.for_task(
            world_task, temperature=label_temperature, flip_rate=flip_rate, length_bias=length_bias,
            tie_margin=tie_margin, seed=seed, cache_path=cache)
        rows = generate_preferences(policy, tokenizer, world_task, n, samples_per_prompt=samples_per_prompt,
                                    annotator=annotator, format=format, threshold=threshold, **sampling)
    atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    stats = {**rows.stats, "model": model, "out": str(out)}
    atomic_write_json(out.with_name(out.stem + ".stats.json"), _finite(stats))
    load_rows(out, format=rows.format)  # what we wrote must load back in its format
    _print_summary(stats)


def _finite(obj):
    """NaN (a mean over no rows) is not JSON; write null instead."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _print_summary(stats: dict) -> None:
    table = Table(title=f"{stats['rows']} {stats['format']} rows on {stats['task']} → {stats['out']}")
    table.add_column("item")
    table.add_column("value", justify="right")
    flat = {k: v for k, v in stats.items() if k not in ("annotator", "out", "task", "format")}
    flat.update({f"annotator.{k}": v for k, v in stats.get("annotator", {}).items()})
    for key, value in flat.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
