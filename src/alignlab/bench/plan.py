"""A suite as jobs: the prepare stages of each task, then its cells (task × algorithm × sweep
point × seed), each with the fully resolved, validated config its process runs.

Layout of a run directory::

    suite.yaml                               the suite as run
    prepare/<task>/sft/                      job.json, config.yaml, train/ (a training run), DONE
    prepare/<task>/preferences/              job.json, preferences.jsonl, DONE
    prepare/<task>/reward_model/             job.json, config.yaml, train/, DONE
    cells/<task>/<name>/<sweep>/seed_<k>/    job.json, config.yaml, train/, eval.json, DONE

A job is finished when its folder has ``DONE`` (and, for a cell, ``eval.json``); the worker
writes ``DONE`` last.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignlab.bench.config import BEST_OF_N, PLACEHOLDERS, BestOfNSection, StageSpec, SuiteConfig
from alignlab.core.config import format_validation_error, set_dotted, with_section_defaults
from alignlab.core.errors import ConfigError


@dataclass
class Job:
    id: str
    """Its folder relative to the run directory, e.g. ``cells/positive/dpo/beta=0.1/seed_0``."""
    kind: str
    """``train`` (a prepare stage), ``preferences`` or ``cell`` (train if any, then evaluate)."""
    spec: dict[str, Any]
    """Everything the worker needs (``job.json``)."""
    deps: list[str] = field(default_factory=list)
    total_steps: int | None = None

    def dir(self, run_dir: Path) -> Path:
        return run_dir / self.id

    def finished(self, run_dir: Path) -> bool:
        d = self.dir(run_dir)
        return (d / "DONE").exists() and (self.kind != "cell" or (d / "eval.json").exists())


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def substitute(obj: Any, values: dict[str, str], where: str) -> Any:
    """``{name}`` placeholders in every string of ``obj`` replaced by ``values[name]``."""
    if isinstance(obj, dict):
        return {k: substitute(v, values, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, values, where) for v in obj]
    if not isinstance(obj, str):
        return obj

    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name not in values:
            have = [p for p in PLACEHOLDERS if p in values]
            raise ConfigError(f"{where}: placeholder {{{name}}} is not available here; "
                              f"available: {', '.join('{' + p + '}' for p in have)}")
        return values[name]

    return _PLACEHOLDER.sub(repl, obj)


def _read_yaml(path: Path, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {path}: the top level must be a mapping of sections")
    return data


def train_config(stage: StageSpec | Any, *, defaults: dict[str, Any], point: dict[str, Any],
                 forced: dict[str, Any], values: dict[str, str], base_dir: Path,
                 where: str) -> dict[str, Any]:
    """The validated config of one training run, as plain data: the base config file, then the
    bench's ``defaults`` (only keys whose section the algorithm's config has), the stage's
    ``set``, the sweep ``point``, the ``forced`` keys, placeholders substituted last."""
    from alignlab.algorithms.registry import ALGORITHMS

    cls = ALGORITHMS.get(stage.algorithm).config_cls
    data: dict[str, Any] = {}
    if stage.config:
        path = Path(stage.config)
        data = _read_yaml(path if path.is_absolute() else base_dir / path, where)
    for key, value in defaults.items():
        if key.split(".")[0] in cls.model_fields:
            set_dotted(data, key, value, merge=True)
    for key, value in [*stage.set.items(), *point.items(), *forced.items()]:
        set_dotted(data, key, value, merge=True)
    data = substitute(data, values, where)
    from pydantic import ValidationError

    try:
        cfg = cls.model_validate(with_section_defaults(cls, data))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls, where)) from None
    return cfg.model_dump(mode="json")


def sweep_points(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


def sweep_label(point: dict[str, Any]) -> str:
    """``beta=0.1,kl_coef=0.05`` from ``{preference.beta: 0.1, rl.kl_coef: 0.05}`` (the last
    part of each key, unless two keys share it); ``default`` for no sweep."""
    if not point:
        return "default"
    last = [k.split(".")[-1] for k in point]
    names = [s if last.count(s) == 1 else k for s, k in zip(last, point)]
    return ",".join(f"{n}={v}" for n, v in zip(names, point.values())).replace("/", "_")


def plan(suite: SuiteConfig, run_dir: Path) -> list[Job]:
    """Every job of the suite, each task's prepare stages before its cells, dependencies named."""
    run_dir = run_dir.resolve()
    jobs: list[Job] = []
    for task in suite.tasks:
        prepare, values = prepare_jobs(suite, task, run_dir)
        jobs += prepare + cell_jobs(suite, task, values, [j.id for j in prepare], run_dir)
    return jobs


def prepare_jobs(suite: SuiteConfig, task: str, run_dir: Path) -> tuple[list[Job], dict[str, str]]:
    """The task's prepare stages (SFT → preferences → reward model, each one optional, each
    needing the ones before it) and the placeholder values they define."""
    prep, world = suite.prepare, suite.world.model_dump(mode="json")
    values = {"task": task, "seed": str(prep.seed), "reference": "world:base"}
    jobs: list[Job] = []

    def train_stage(stage: StageSpec, name: str, defaults: dict[str, Any]) -> str:
        jid = f"prepare/{task}/{name}"
        cfg = train_config(stage, defaults={**defaults, "train.progress": False,
                                            "train.tensorboard": False},
                           point={}, forced={"world": world, "train.seed": prep.seed,
                                             "train.output_dir": str(run_dir / jid / "train")},
                           values=values, base_dir=Path(suite._base_dir or "."),
                           where=f"prepare.{name} ({task})")
        jobs.append(Job(jid, "train", {"kind": "train", "algorithm": stage.algorithm, "config": cfg},
                        [j.id for j in jobs], cfg["train"]["max_steps"]))
        return str(run_dir / jid / "train" / "final")

    if prep.sft is not None:
        values["reference"] = train_stage(prep.sft, "sft", {"model.name_or_path": "world:base",
                                                            "data.source": "world:{task}"})
    if prep.preferences is not None:
        jid = f"prepare/{task}/preferences"
        values["preferences"] = str(run_dir / jid / "preferences.jsonl")
        jobs.append(Job(jid, "preferences", {
            "kind": "preferences", "world": world, "task": task, "reference": values["reference"],
            "seed": prep.seed, "out": values["preferences"], **prep.preferences.model_dump(mode="json")},
            [j.id for j in jobs]))
    if prep.reward_model is not None:
        values["reward_model"] = train_stage(prep.reward_model, "reward_model", {
            "model.name_or_path": "{reference}",
            "data.source": values.get("preferences", "world:{task}")})
    return jobs, values


def cell_jobs(suite: SuiteConfig, task: str, values: dict[str, str], deps: list[str],
              run_dir: Path) -> list[Job]:
    """The task's cells: the reference per seed, then algorithm × sweep point × seed."""
    evaluation = {**suite.eval.model_dump(mode="json"),
                  "pass_at_k": suite.eval.pass_at_k if task in suite.eval.verifiable_tasks else []}
    common = {"kind": "cell", "task": task, "world": suite.world.model_dump(mode="json"),
              "reference": values["reference"], "base": "world:base",
              "proxy": values.get("reward_model"), "eval": evaluation}
    jobs: list[Job] = []
    if suite.reference_cells:
        for seed in suite.seeds:
            jobs.append(Job(f"cells/{task}/reference/default/seed_{seed}", "cell", {
                **common, "name": "reference", "algorithm": "reference", "sweep": {}, "seed": seed,
                "train": None, "best_of_n": None, "budget": {}}, list(deps)))
    for spec in suite.algorithms:
        if spec.tasks is not None and task not in spec.tasks:
            continue
        for point in sweep_points(spec.sweep):
            label = sweep_label(point)
            for seed in suite.seeds:
                jid = f"cells/{task}/{spec.name}/{label}/seed_{seed}"
                where = f"algorithms '{spec.name}' ({task}, {label}, seed {seed})"
                cell = {**common, "name": spec.name, "algorithm": spec.algorithm, "sweep": point,
                        "seed": seed, "train": None, "best_of_n": None}
                total = None
                if spec.algorithm == BEST_OF_N:
                    bon = BestOfNSection.model_validate({**spec.set, **point})
                    if bon.reward == "proxy" and values.get("reward_model") is None:
                        raise ConfigError(f"{where}: best-of-n by the proxy needs prepare.reward_model")
                    cell["best_of_n"] = bon.model_dump(mode="json")
                    cell["budget"] = {"samples": bon.n * suite.eval.samples_per_prompt
                                      * suite.eval.n_prompts}
                else:
                    cfg = _cell_config(suite, spec, point, seed, values, where, run_dir / jid / "train")
                    cell["train"] = {"algorithm": spec.algorithm, "config": cfg}
                    cell["budget"] = budget_of(cfg)
                    total = cfg["train"]["max_steps"]
                jobs.append(Job(jid, "cell", cell, list(deps), total))
    return jobs


def _cell_config(suite: SuiteConfig, spec: Any, point: dict[str, Any], seed: int,
                 values: dict[str, str], where: str, output_dir: Path) -> dict[str, Any]:
    from alignlab.algorithms.registry import ALGORITHMS

    fields = ALGORITHMS.get(spec.algorithm).config_cls.model_fields
    offline_prefs = "preference" in fields or "reward" in fields
    defaults: dict[str, Any] = {
        "model.name_or_path": "{reference}", "rollout.prompts": "world:{task}",
        "data.source": values.get("preferences", "world:{task}") if offline_prefs else "world:{task}",
        "train.progress": False, "train.tensorboard": False}
    if suite.budget.steps is not None:
        defaults["train.max_steps"] = suite.budget.steps
    if suite.budget.labels is not None and offline_prefs:
        defaults["data.limit"] = suite.budget.labels
    judged = _judged_section(fields)
    if suite.budget.labels is not None and judged is not None:
        # An online preference cell asks its judge as it goes: the budget caps its new labels.
        defaults[f"{judged}.judge.max_labels"] = suite.budget.labels
    return train_config(spec, defaults=defaults, point=point,
                        forced={"world": suite.world.model_dump(mode="json"), "train.seed": seed,
                                "train.output_dir": str(output_dir)},
                        values={**values, "seed": str(seed)}, base_dir=Path(suite._base_dir or "."),
                        where=where)


def _judged_section(fields: dict[str, Any]) -> str | None:
    """The config section of an online preference algorithm that holds its ``judge``."""
    for name, f in fields.items():
        inner = getattr(f.annotation, "model_fields", {})
        if "judge" in inner and "max_labels" in getattr(inner["judge"].annotation, "model_fields", {}):
            return name
    return None


def budget_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a training cell may consume: optimizer steps; for online runs the samples drawn
    (steps × prompts per step × n) and, for online preference runs, the judge's label budget
    (``judge.max_labels``; without one, online DPO's one pair per two samples); for offline
    preference or reward runs the labelled rows (``data.limit``, when set)."""
    out: dict[str, Any] = {"steps": cfg["train"]["max_steps"]}
    if "rollout" in cfg:
        r = cfg["rollout"]
        out["samples"] = cfg["train"]["max_steps"] * r["prompts_per_step"] * r["n"]
        judge = next((v["judge"] for v in cfg.values()
                      if isinstance(v, dict) and isinstance(v.get("judge"), dict)), None)
        if judge is not None and judge.get("max_labels") is not None:
            out["labels"] = judge["max_labels"]
        elif "online_dpo" in cfg:
            out["labels"] = out["samples"] // 2  # one judged pair per two samples
    elif "data" in cfg and ("preference" in cfg or "reward" in cfg):
        out["labels"] = cfg["data"].get("limit")
    return out
