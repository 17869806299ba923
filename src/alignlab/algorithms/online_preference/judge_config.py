"""The judge of online preference learning, from config (``online_dpo.judge``).

``kind`` picks the judge (``rewards/judges``):

- ``reward``: Bradley-Terry on a pointwise reward (the world's gold, a reward model, …);
- ``annotator``: a simulated annotator whose gold is that reward (AlpacaFarm-style noise);
- ``pool``: a pool of simulated annotators with different biases, each example labelled by one
  (AlpacaFarm: Dubois et al. 2023; ``rewards/annotator_pool.py``);
- ``llm``: a local causal LM asked "Which response is better, A or B?" (Zheng et al. 2023,
  "Judging LLM-as-a-Judge"; ``rewards/judges/llm.py``);
- ``preference_model``: a general pairwise preference model trained by ``alignlab train
  preference_model`` (Munos et al. 2023, NLHF; ``rewards/judges/preference_model.py``).

Every judge is wrapped in the labelling budget (``max_labels``, ``rewards/judges/budget.py``):
pairs beyond it get no verdict and are skipped, so methods compare at equal feedback cost.
Settings the chosen kind does not read are refused, naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from alignlab.core.config import Section, WorldSection
from alignlab.core.errors import ConfigError
from alignlab.core.runtime import pick_device
from alignlab.engine import distributed
from alignlab.rewards.annotator import SimulatedAnnotator
from alignlab.rewards.annotator_pool import DEFAULT_POOL, AnnotatorPool, PoolAnnotator
from alignlab.rewards.judges import (
    DEFAULT_TEMPLATE,
    AnnotatorJudge,
    BudgetedJudge,
    JudgeTemplate,
    LLMJudge,
    PairwiseJudge,
    PreferenceModelJudge,
    RewardJudge,
)
from alignlab.rewards.preference_model import PREFERENCE_MODEL_CONFIG, is_preference_model
from alignlab.rewards.scoring import build_reward_role
from alignlab.world.resolve import resolve_model_path


class LLMJudgeSection(Section):
    model: str = "world:base"
    """The judge LM: a local model directory, a cached Hub name, or ``world:base``."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    mode: Literal["logprob", "generate"] = "logprob"
    """``logprob``: P(a ≻ b) from the probabilities of the two labels; ``generate``: a greedy
    answer read by the template's pattern."""
    template: str | None = None
    """A YAML file with ``text`` (holding ``{prompt}``, ``{a}``, ``{b}``), ``version`` and
    optionally ``labels`` and ``pattern``; None: the built-in ``pairwise-ab-v1``."""
    debias: bool = True
    """Judge both orders and average (position-swap debiasing)."""
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(8, gt=0)
    """``generate`` mode: the answer's length limit."""
    on_parse_error: Literal["raise", "skip"] = "raise"
    """``generate`` mode: stop on an unreadable answer, or skip that pair (counted)."""
    chat: bool = False
    """Wrap the judge prompt in the tokenizer's chat template."""


class PreferenceModelJudgeSection(Section):
    path: str | None = None
    """The trained preference model: the ``final/`` folder ``alignlab train preference_model``
    writes (required for ``kind: preference_model``)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    debias: bool = True
    """Read both orders and average (P(a ≻ b) = 1 − P(b ≻ a) exactly); off: a shown first."""
    batch_size: int = Field(16, gt=0)
    """Sequences per forward pass (a debiased pair is two)."""


class PoolAnnotatorSection(Section):
    name: str
    temperature: float = Field(0.05, ge=0)
    length_bias: float = 0.0
    position_bias: float = Field(0.0, ge=0, le=1)
    flip_rate: float = Field(0.0, ge=0, le=1)
    tie_margin: float | None = Field(None, ge=0)


class PoolSection(Section):
    annotators: list[PoolAnnotatorSection] | None = None
    """None: the built-in pool of four (careful, verbose, first_shown, noisy)."""


class JudgeSection(Section):
    kind: Literal["reward", "annotator", "pool", "llm", "preference_model"] = "reward"
    """``reward``: Bradley-Terry on a pointwise reward; ``annotator``: a simulated annotator
    whose gold is that reward; ``pool``: a pool of biased simulated annotators (AlpacaFarm);
    ``llm``: a local LM as the judge; ``preference_model``: a trained pairwise preference
    model."""
    reward: str | dict[str, float] = "gold"
    """``gold``, a registered reward (e.g. ``reward_model``), ``module:function`` or weights
    (the gold of ``annotator`` and ``pool``)."""
    reward_params: dict[str, dict[str, Any]] = {}
    temperature: float = Field(1.0, gt=0)
    """τ of P(a ≻ b) = σ((r_a − r_b)/τ) (also the annotator's)."""
    flip_rate: float = Field(0.0, ge=0, le=1)
    """Annotator: probability of flipping a label; pool: the extra flip on every label."""
    length_bias: float = 0.0
    """Annotator: its taste for length, in reward units per word."""
    tie_margin: float | None = Field(None, ge=0)
    """Annotator (and every pool annotator): pairs whose rewards differ by at most this are
    ties (dropped)."""
    max_labels: int | None = Field(None, gt=0)
    """The labelling budget: new labels allowed over the run (cache hits are free); pairs
    beyond it are skipped. None: unlimited (still counted as ``labels_used``)."""
    cache: str | None = None
    """JSONL file of the ``annotator``, ``pool``, ``llm`` or ``preference_model`` judge's
    labels, reused across runs; None: kept in memory for the run."""
    llm: LLMJudgeSection = LLMJudgeSection()
    pool: PoolSection = PoolSection()
    preference_model: PreferenceModelJudgeSection = PreferenceModelJudgeSection()


_READS = {
    "reward": {"reward", "reward_params", "temperature"},
    "annotator": {"reward", "reward_params", "temperature", "flip_rate", "length_bias",
                  "tie_margin", "cache"},
    "pool": {"reward", "reward_params", "flip_rate", "tie_margin", "cache", "pool"},
    "llm": {"cache", "llm"},
    "preference_model": {"cache", "preference_model"},
}


def check_judge_section(section: JudgeSection, field: str) -> None:
    """Refuse a setting the chosen kind would silently ignore."""
    for name, info in JudgeSection.model_fields.items():
        if name in ("kind", "max_labels") or name in _READS[section.kind]:
            continue
        if getattr(section, name) != info.get_default(call_default_factory=True):
            users = sorted(k for k, reads in _READS.items() if name in reads)
            raise ConfigError(f"field '{field}.{name}': not used by {field}.kind="
                              f"{section.kind}; it applies to kind {', '.join(users)}")


def load_template(path: str | None, field: str) -> JudgeTemplate:
    if path is None:
        return DEFAULT_TEMPLATE
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"field '{field}': cannot read the template {path}: {exc}") from None
    allowed = {f.name for f in dataclasses.fields(JudgeTemplate)}
    if not isinstance(data, dict) or not {"text", "version"} <= set(data) or set(data) - allowed:
        raise ConfigError(f"field '{field}': {path} must be a mapping with text and version "
                          f"(allowed keys: {', '.join(sorted(allowed))})")
    if "labels" in data:
        data["labels"] = tuple(data["labels"])
    try:
        return JudgeTemplate(**data)
    except ConfigError as exc:
        raise ConfigError(f"field '{field}': {exc}") from None


def make_judge(section: JudgeSection, task: Any, seed: int, *, world: WorldSection,
               device: Any = "cpu", field: str = "online_dpo.judge",
               place: Callable[[Callable[[], PairwiseJudge]], PairwiseJudge] | None = None
               ) -> BudgetedJudge:
    """The judge ``section`` describes, inside its labelling budget (with N processes each
    judges its own prompts' pairs within its even share of ``max_labels``). ``place`` builds
    the judge itself from its factory where the run's placement puts it (a Ray reward worker);
    the budget stays with the caller. A ``device`` string (``train.device``) is resolved where
    the judge is built."""
    check_judge_section(section, field)
    budget = section.max_labels
    if budget is not None and distributed.world_size() > 1:
        size, rank = distributed.world_size(), distributed.rank()
        budget = budget // size + (rank < budget % size)
    build = functools.partial(_judge, section, task, seed, world, device, field)
    return BudgetedJudge(build() if place is None else place(build), budget)


def _judge(section: JudgeSection, task: Any, seed: int, world: WorldSection, device: Any,
           field: str) -> PairwiseJudge:
    device = pick_device(device) if isinstance(device, str) else device
    if section.kind == "preference_model":
        s = section.preference_model
        where = f"{field}.preference_model.path"
        if s.path is None:
            raise ConfigError(f"field '{where}': required by {field}.kind=preference_model (the "
                              "final/ folder `alignlab train preference_model` writes)")
        if not is_preference_model(s.path):
            raise ConfigError(f"field '{where}': {s.path!r} is not a preference model folder "
                              f"(no {PREFERENCE_MODEL_CONFIG}; `alignlab train preference_model` "
                              "writes <output_dir>/final)")
        return PreferenceModelJudge.from_pretrained(
            s.path, dtype=s.dtype, device=device, debias=s.debias, batch_size=s.batch_size,
            cache_path=section.cache)
    if section.kind == "llm":
        s = section.llm
        return LLMJudge.from_pretrained(
            resolve_model_path(s.model, world), dtype=s.dtype, device=device,
            template=load_template(s.template, f"{field}.llm.template"), mode=s.mode,
            debias=s.debias, batch_size=s.batch_size, max_new_tokens=s.max_new_tokens,
            on_parse_error=s.on_parse_error, chat=s.chat, cache_path=section.cache)
    role = build_reward_role(section.reward, task, params=section.reward_params,
                             field=f"{field}.reward")

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        return role.score(prompts, completions, {}).scores

    if section.kind == "reward":
        return RewardJudge(reward, section.temperature)
    if section.kind == "annotator":
        return AnnotatorJudge(SimulatedAnnotator(
            reward, name=str(section.reward), temperature=section.temperature,
            flip_rate=section.flip_rate, length_bias=section.length_bias,
            tie_margin=section.tie_margin, seed=seed, cache_path=section.cache))
    annotators = (DEFAULT_POOL if section.pool.annotators is None else
                  [PoolAnnotator(**a.model_dump()) for a in section.pool.annotators])
    if section.tie_margin is not None:
        annotators = [dataclasses.replace(a, tie_margin=section.tie_margin) for a in annotators]
    try:
        return AnnotatorPool(reward, annotators, name=str(section.reward),
                             flip_rate=section.flip_rate, seed=seed, cache_path=section.cache)
    except ConfigError as exc:
        raise ConfigError(f"field '{field}.pool': {exc}") from None


__all__ = ["JudgeSection", "LLMJudgeSection", "PoolAnnotatorSection", "PoolSection",
           "PreferenceModelJudgeSection", "check_judge_section", "load_template", "make_judge"]
