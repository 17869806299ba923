"""The typed suite of ``alignlab bench run SUITE.yaml``: tasks × algorithms × sweeps × seeds at
fixed budgets, plus the stages every cell of a task starts from.

```yaml
name: quick
world: {preset: tiny}
tasks: [positive, arithmetic]
seeds: [0, 1]
budget: {steps: 10, labels: 256}       # train.max_steps of every cell; rows of preference data
prepare:                               # once per task (seed prepare.seed), before its cells
  sft: {algorithm: sft, set: {train.lr: 1.0e-3}}      # the reference policy; none: world:base
  preferences: {n: 256}                # sampled from the reference, labelled by the annotator
  reward_model: {algorithm: reward}    # the proxy reward, trained on {preferences}
eval: {n_prompts: 32, samples_per_prompt: 4, pass_at_k: [1, 4]}
algorithms:
  - name: dpo
    algorithm: dpo                     # any `alignlab train` algorithm, or best_of_n
    config: ../../examples/dpo_world.yaml   # relative to this file (optional)
    set: {train.lr: 1.0e-4}
    sweep: {preference.beta: [0.1, 0.5]}
  - name: best_of_n
    algorithm: best_of_n
    set: {reward: proxy}
    sweep: {n: [2, 8]}
```

String values in ``set`` (and the defaults the bench gives) may name ``{task}``, ``{seed}``,
``{reference}`` (the reference policy), ``{preferences}`` (the preference rows) and
``{reward_model}`` (the proxy reward model's folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from alignlab.core.config import Section, WorldSection, load_config

BEST_OF_N = "best_of_n"
PLACEHOLDERS = ("task", "seed", "reference", "preferences", "reward_model")


def _check_algorithm(name: str, allow_best_of_n: bool) -> str:
    from alignlab.algorithms.registry import ALGORITHMS

    allowed = ALGORITHMS.names() + ([BEST_OF_N] if allow_best_of_n else [])
    if name not in allowed:
        raise ValueError(f"unknown algorithm {name!r}; allowed values: {', '.join(allowed)}")
    return name


class StageSpec(Section):
    """A training run: an ``alignlab train`` algorithm, an optional base config file (relative to
    the suite file) and dotted overrides."""

    algorithm: str
    config: str | None = None
    set: dict[str, Any] = {}

    @field_validator("algorithm")
    @classmethod
    def _known(cls, value: str) -> str:
        return _check_algorithm(value, allow_best_of_n=False)


class AnnotatorSpec(Section):
    """A simulated annotator (``rewards/annotator.py``): Bradley-Terry on gold + length bias."""

    temperature: float = Field(0.05, ge=0)
    flip_rate: float = Field(0.25, ge=0, le=1)
    length_bias: float = 0.0


class PreferencesSpec(Section):
    """Preference rows sampled from the reference policy on the task's train prompts and
    labelled by a simulated annotator (``engine/preference_data.py``)."""

    n: int = Field(512, gt=0)
    samples_per_prompt: int = Field(2, ge=2)
    annotator: AnnotatorSpec = AnnotatorSpec()


class PrepareSection(Section):
    sft: StageSpec | None = None
    """The reference policy (start of every cell, reference of KL and win rates); None: the
    world's base model."""
    preferences: PreferencesSpec | None = None
    reward_model: StageSpec | None = None
    """The proxy reward (``{reward_model}``); trained on ``{preferences}`` when there are any."""
    seed: int = 0
    """One seed for the prepare stages: every seed of a cell starts from the same reference
    and is scored by the same proxy (as in Gao et al. 2023)."""


class BudgetSection(Section):
    steps: int | None = Field(None, gt=0)
    """``train.max_steps`` of every training cell (optimizer steps offline, iterations online)."""
    labels: int | None = Field(None, gt=0)
    """``data.limit`` of every offline preference or reward-model cell: the labelled rows it sees."""


class BenchEvalSection(Section):
    """Evaluation of every cell on its task's held-out prompts, at temperature 1."""

    n_prompts: int = Field(32, gt=0)
    samples_per_prompt: int = Field(4, gt=0)
    max_new_tokens: int | None = Field(None, gt=0)
    """Defaults to the task's own."""
    batch_size: int = Field(64, gt=0)
    seed: int = 1234
    pass_at_k: list[int] = [1]
    """k values of pass@k on verifiable tasks; each at most ``samples_per_prompt``."""
    verifiable_tasks: list[str] = ["arithmetic"]
    """Tasks whose gold is 1 for a correct completion (pass@k is reported for them)."""
    annotator: AnnotatorSpec = AnnotatorSpec()
    """The annotator of ``win_rate_annotator``."""
    self_bleu_max_texts: int = Field(256, ge=2)

    @model_validator(mode="after")
    def _k_fits(self) -> BenchEvalSection:
        bad = [k for k in self.pass_at_k if not 1 <= k <= self.samples_per_prompt]
        if bad:
            raise ValueError(f"pass_at_k {bad}: each k must be in 1..samples_per_prompt "
                             f"({self.samples_per_prompt})")
        return self


class BestOfNSection(Section):
    """Best-of-n cells: ``n`` samples from the reference policy, the best by ``reward`` kept."""

    n: int = Field(4, gt=0)
    reward: Literal["proxy", "gold"] = "proxy"
    aggregate: Literal["mean", "min", "mean_minus_std"] | None = None
    """How a proxy ensemble's members are combined to pick (Coste et al. 2024, "Reward Model
    Ensembles Help Mitigate Overoptimization"); None: the ensemble's own. ``proxy_mean`` is
    still reported with the ensemble's own aggregate."""
    std_coef: float | None = Field(None, ge=0)
    """λ of ``mean_minus_std``."""


class AlgorithmSpec(Section):
    name: str = Field(min_length=1)
    """The label in the leaderboard and plots (unique in the suite)."""
    algorithm: str
    """An ``alignlab train`` algorithm (``alignlab list algorithms``) or ``best_of_n``."""
    config: str | None = None
    set: dict[str, Any] = {}
    sweep: dict[str, list[Any]] = {}
    """Dotted key → values; the cells are the grid (cartesian product) of all keys."""
    tasks: list[str] | None = None
    """The tasks this algorithm runs on; None: all the suite's tasks."""

    @field_validator("algorithm")
    @classmethod
    def _known(cls, value: str) -> str:
        if value == "reward":
            raise ValueError("a reward model is not a policy to evaluate; train it as "
                             "prepare.reward_model (the proxy reward, {reward_model})")
        return _check_algorithm(value, allow_best_of_n=True)

    @field_validator("name")
    @classmethod
    def _path_safe(cls, value: str) -> str:
        if not all(ch.isalnum() or ch in "-_." for ch in value) or value.startswith("."):
            raise ValueError(f"name {value!r}: use letters, digits, '-', '_' and '.' (it names a folder)")
        return value

    @field_validator("sweep")
    @classmethod
    def _non_empty(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, v in value.items() if not v]
        if empty:
            raise ValueError(f"sweep {', '.join(empty)}: give at least one value")
        return value


class SuiteConfig(Section):
    name: str = Field(min_length=1)
    description: str = ""
    world: WorldSection = WorldSection(preset="tiny")
    tasks: list[str] = Field(min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    budget: BudgetSection = BudgetSection()
    prepare: PrepareSection = PrepareSection()
    eval: BenchEvalSection = BenchEvalSection()
    algorithms: list[AlgorithmSpec] = Field(min_length=1)
    reference_cells: bool = True
    """Evaluate the reference policy itself as a cell (``reference``: KL 0, win rate ½) per task
    and seed, the baseline row of each task."""
    _base_dir: str | None = PrivateAttr(None)
    """Where relative ``config`` paths are resolved: the suite file's folder (set on load)."""

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        from alignlab.world.tasks import TASKS

        bad = [t for t in value if t not in TASKS.names()]
        if bad:
            raise ValueError(f"unknown task {bad[0]!r}; allowed values: {', '.join(TASKS.names())}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SuiteConfig:
        names = [a.name for a in self.algorithms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"algorithm names must be unique; repeated: {', '.join(dup)}")
        if "reference" in names and self.reference_cells:
            raise ValueError("the name 'reference' is the reference cells'; pick another name")
        for a in self.algorithms:
            outside = [t for t in (a.tasks or []) if t not in self.tasks]
            if outside:
                raise ValueError(f"algorithm {a.name!r}: tasks {outside} are not in the suite's tasks")
            if a.algorithm == BEST_OF_N:
                BestOfNSection.model_validate({**a.set, **{k: v[0] for k, v in a.sweep.items()}})
                if (a.set.get("reward", "proxy") == "proxy" or "proxy" in a.sweep.get("reward", [])) \
                        and self.prepare.reward_model is None:
                    raise ValueError(f"algorithm {a.name!r}: best-of-n by the proxy reward needs "
                                     "prepare.reward_model")
        return self


SHIPPED = Path(__file__).parent / "suites"


def shipped_suites() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def suite_path(name_or_path: str | Path) -> Path:
    """A suite file, or the name of a shipped suite (``quick``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    shipped = SHIPPED / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    from alignlab.core.errors import ConfigError

    raise ConfigError(f"no suite file {name_or_path!r} and no shipped suite of that name; "
                      f"shipped suites: {', '.join(shipped_suites())}")


def load_suite(name_or_path: str | Path, overrides: list[str] | None = None) -> SuiteConfig:
    """Read and validate a suite (a file or a shipped name); ``a.b=c`` overrides as in
    ``alignlab train --set``."""
    path = suite_path(name_or_path)
    suite = load_config(SuiteConfig, path, overrides or [])
    suite._base_dir = str(path.resolve().parent)
    return suite
