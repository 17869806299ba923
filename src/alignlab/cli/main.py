"""The ``alignlab`` command: build the world, train, evaluate, list registries, run the demo."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from alignlab.core.errors import AlignlabError

app = typer.Typer(
    help="alignlab: train language models from feedback (demonstrations, rewards, preferences) "
         "and measure which method wins on a built-in feedback world.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
world_app = typer.Typer(help="Build or inspect the built-in feedback world.", no_args_is_help=True)
app.add_typer(world_app, name="world")
from alignlab.cli.data import data_app  # noqa: E402
from alignlab.cli.evaluate import REWARD_HELP, eval_user  # noqa: E402
from alignlab.cli.generate import chat, generate  # noqa: E402

app.add_typer(data_app, name="data")
from alignlab.cli.bench import bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")
console = Console()

PresetOpt = Annotated[str, typer.Option(help="World preset: full (demo) or tiny (tests).")]
SeedOpt = Annotated[int, typer.Option(help="World seed.")]
CacheOpt = Annotated[Optional[str], typer.Option(help="Cache folder (default $ALIGNLAB_CACHE or ~/.cache/alignlab).")]


@world_app.command("build")
def world_build(preset: PresetOpt = "full", seed: SeedOpt = 0, cache_dir: CacheOpt = None,
                force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False) -> None:
    """Generate the corpus, train the tokenizer and pretrain the base model (cached)."""
    from alignlab.world.build import ensure_world

    world = ensure_world(preset, seed, cache_dir, force=force)
    _print_world(world)


@world_app.command("info")
def world_info(preset: PresetOpt = "full", seed: SeedOpt = 0, cache_dir: CacheOpt = None) -> None:
    """Show where a built world lives and what it measured."""
    from alignlab.world.build import World, world_path
    from alignlab.world.presets import get_preset

    path = world_path(preset, seed, cache_dir)
    if not (path / "manifest.json").exists():
        raise AlignlabError(f"no {preset} world with seed {seed} at {path}; run `alignlab world build --preset {preset}`")
    _print_world(World(path, get_preset(preset), seed))


def _print_world(world) -> None:
    m = world.manifest
    table = Table(title=f"world {world.preset.name} (seed {world.seed})")
    table.add_column("item")
    table.add_column("value")
    for key in ("n_parameters", "vocab_size", "heldout_ppl", "heldout_unigram_ppl", "build_seconds",
                "corpus_sha256", "tokenizer_sha256"):
        v = m.get(key)
        table.add_row(key, f"{v:.3f}" if isinstance(v, float) else str(v))
    table.add_row("base model", str(world.base_dir))
    console.print(table)


@app.command()
def train(algorithm: Annotated[str, typer.Argument(help="Algorithm name (see `alignlab list algorithms`).")],
          config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")] = None,
          set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override, e.g. train.lr=1e-4 (repeatable).")] = None,
          num_processes: Annotated[int, typer.Option("--num-processes", min=1, help="Data-parallel processes on this machine (gloo on CPU, nccl on GPUs); each takes 1/N of every batch (docs/scaling.md).")] = 1) -> None:
    """Train with ALGORITHM on the data and model named in the config.

    `alignlab train ALGORITHM --help` lists that trainer's config sections and fields."""
    from alignlab.algorithms.registry import ALGORITHMS
    from alignlab.core.config import load_config
    from alignlab.engine import distributed
    from alignlab.engine.run import CONFIG_FILE, check_processes

    entry = ALGORITHMS.get(algorithm)
    cfg = load_config(entry.config_cls, config, set_ or [])
    if num_processes > 1 and not distributed.launched():
        check_processes(cfg, num_processes)  # before any process starts
        sys.exit(distributed.launch(num_processes, _without_num_processes(sys.argv[1:])))
    if distributed.launched() and os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- rank 0 alone reports progress
    out = Path(cfg.train.output_dir)
    console.print(f"[bold]alignlab train {algorithm}[/bold] → {out} (full config in "
                  f"{out / CONFIG_FILE})", highlight=False, soft_wrap=True)
    run = entry.run(cfg)
    distributed.shutdown()  # every rank finished (a failing one ends the launch instead)
    result = getattr(run, "result", run)
    console.print(f"done: {result.step} steps in {result.seconds:.1f}s → {result.output_dir / 'final'}")


def _without_num_processes(argv: list[str]) -> list[str]:
    """``argv`` for each launched process: the same command without ``--num-processes``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            out.append(arg)
    return out


@app.command("eval")
def eval_cmd(model: Annotated[str, typer.Option(help="Model directory, Hub name, or world:base.")] = "world:base",
             task: Annotated[str, typer.Option(help="World task (see `alignlab list tasks`).")] = "positive",
             out: Annotated[Path, typer.Option(help="Folder for eval.json and eval.md.")] = Path("runs/eval"),
             n_prompts: Annotated[Optional[int], typer.Option(help="Default: 128 task prompts, every row of --prompts.")] = None,
             samples_per_prompt: int = 1, temperature: float = 1.0,
             max_new_tokens: Optional[int] = None, seed: int = 1234,
             prompts: Annotated[Optional[str], typer.Option(help="Your prompts instead of --task: JSONL/Parquet of prompt-only rows (or world:<task>).")] = None,
             reward: Annotated[Optional[list[str]], typer.Option(help=REWARD_HELP)] = None,
             reward_params: Annotated[Optional[str], typer.Option(help="YAML {reward: {param: value}}.")] = None,
             reference: Annotated[Optional[str], typer.Option(help="Also estimate KL(model || reference) per sequence on the samples: kl_ref = mean of sum_t log(pi/pi_ref) (k1), kl_ref_k3 (k3).")] = None,
             preset: PresetOpt = "full", world_seed: SeedOpt = 0, cache_dir: CacheOpt = None) -> None:
    """Sample on a task's eval prompts: gold reward, perplexity, length, distinct-n; or on your
    --prompts with your --reward: mean reward (per component), length, distinct-n, KL."""
    from alignlab.algorithms.common import load_policy
    from alignlab.core.config import EvalSection, ModelSection, WorldSection
    from alignlab.eval.evaluate import evaluate, write_report
    from alignlab.world.resolve import get_world

    world_cfg = WorldSection(preset=preset, seed=world_seed, cache_dir=cache_dir)
    if prompts or reward or reference:  # the user's prompts and reward: cli/evaluate.py
        return eval_user(model, prompts, reward, reference, reward_params, out=out, n_prompts=n_prompts,
                         samples_per_prompt=samples_per_prompt, temperature=temperature,
                         max_new_tokens=max_new_tokens, seed=seed, world=world_cfg)
    policy, tokenizer = load_policy(ModelSection(name_or_path=model), world_cfg)
    world = get_world(world_cfg)
    eval_cfg = EvalSection(task=task, n_prompts=n_prompts or 128, samples_per_prompt=samples_per_prompt,
                           temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    result = evaluate(policy, tokenizer, world.task(task), eval_cfg, heldout_texts=world.corpus("heldout"))
    path = write_report(result, out)
    table = Table(title=f"eval {model} on {task}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    console.print(f"wrote {path} and {path.with_suffix('.md')}")


REGISTRIES = ("losses", "algorithms", "rewards", "tasks", "advantages", "kl", "formats")


@app.command("list")
def list_cmd(what: Annotated[str, typer.Argument(help=f"One of: {', '.join(REGISTRIES)}.")],
             verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Add a one-line summary.")] = False) -> None:
    """Print a registry, one name a line."""
    for name, summary in registry_entries(what):
        print(f"{name}\t{summary}" if verbose else name)


def registry_entries(what: str) -> list[tuple[str, str]]:
    from alignlab.algorithms.registry import ALGORITHMS
    from alignlab.data.formats import FORMATS
    from alignlab.losses.advantages import ADVANTAGE_ESTIMATORS
    from alignlab.losses.kl import KL_ESTIMATORS
    from alignlab.losses.online_preference import ONLINE_PREFERENCE_TERMS
    from alignlab.losses.policy import POLICY_LOSSES
    from alignlab.losses.preference import PREFERENCE_LOSSES
    from alignlab.rewards.registry import REWARDS
    from alignlab.world.tasks import TASKS

    groups = {"losses": [PREFERENCE_LOSSES, POLICY_LOSSES, ONLINE_PREFERENCE_TERMS],
              "algorithms": [ALGORITHMS],
              "rewards": [REWARDS], "tasks": [TASKS], "advantages": [ADVANTAGE_ESTIMATORS],
              "kl": [KL_ESTIMATORS], "formats": [FORMATS]}
    if what not in groups:
        raise AlignlabError(f"unknown registry {what!r}; allowed values: {', '.join(REGISTRIES)}")
    rows = {}
    for reg in groups[what]:
        for name in reg.names():
            rows.setdefault(name, f"[{reg.kind}] {reg.summary(name)}")
    return sorted(rows.items())


@app.command()
def demo(preset: PresetOpt = "full", out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
         seed: SeedOpt = 0, cache_dir: CacheOpt = None) -> None:
    """The main job: world → SFT on positive demonstrations → eval before/after, table and plot."""
    from alignlab.cli.demo import run_demo

    run_demo(preset=preset, out=out, seed=seed, cache_dir=cache_dir)


app.command()(generate)  # cli/generate.py
app.command()(chat)


def trainer_help(argv: list[str]) -> str | None:
    """The help of ``train NAME --help`` (that trainer's config), else None for click's own."""
    if len(argv) < 3 or argv[0] != "train" or not {"--help", "-h"} & set(argv):
        return None
    name = argv[1]
    if name.startswith("-"):
        return None
    from alignlab.algorithms.registry import ALGORITHMS
    from alignlab.cli.config_help import config_help

    entry = ALGORITHMS.get(name)  # an unknown name: the registry's error lists the known ones
    return config_help(name, entry.config_cls, entry.doc)


def _quiet_console() -> None:
    """One ``warning: ...`` line per warning, and no transformers loading/saving bars (the
    run has its own progress bar)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    default = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):  # noqa: ANN001
        from alignlab.core.errors import AlignlabWarning

        if issubclass(category, AlignlabWarning):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def main() -> None:
    try:
        text = trainer_help(sys.argv[1:])
        if text is not None:
            print(text)
            return
        _quiet_console()
        app()
    except AlignlabError as exc:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
