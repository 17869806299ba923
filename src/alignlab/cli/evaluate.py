"""``alignlab eval --prompts FILE --reward SPEC [--reference MODEL]``: the user's own prompts,
reward and reference (``eval/user.py``); ``alignlab eval --task`` stays the world-task path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from alignlab.core.errors import ConfigError

REWARD_HELP = ("Reward of --prompts (repeatable): a registered name (`alignlab list rewards`), "
               "module:function, ./file.py:function or gold (world:<task> prompts); add =WEIGHT "
               "for a weighted sum, e.g. --reward ./r.py:fn=1 --reward brevity=0.1. Extra "
               "columns of the prompt rows reach the functions as keyword fields.")


def parse_reward_spec(items: list[str]) -> str | dict[str, float]:
    """``['a']`` → ``'a'``; ``['a=1', 'b=0.5']`` → ``{'a': 1.0, 'b': 0.5}`` (the shapes of
    ``rl.reward``). A part after the last ``=`` that is no number belongs to the name."""
    weights: dict[str, float] = {}
    for item in items:
        name, _, weight = item.rpartition("=")
        if name and _is_number(weight):
            weights[name] = float(weight)
        else:
            weights[item] = 1.0
    if not items or not all(weights):
        raise ConfigError("--reward: give a reward name, module:function or ./file.py:function")
    if len(items) == 1 and weights == {items[0]: 1.0}:
        return items[0]
    return weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def eval_user(model: str, prompts: str | None, reward: list[str] | None, reference: str | None,
              reward_params: str | None = None, *, out: Path, n_prompts: int | None,
              samples_per_prompt: int, temperature: float, max_new_tokens: int | None,
              seed: int, world: Any) -> None:
    """Load, sample, score, report: ``eval.json`` and ``eval.md`` in ``out``."""
    from alignlab.algorithms.common import load_policy
    from alignlab.cli.generate import DEFAULT_MAX_NEW_TOKENS
    from alignlab.core.config import ModelSection
    from alignlab.core.runtime import pick_device
    from alignlab.eval.evaluate import write_report
    from alignlab.eval.user import evaluate_user, load_reference, read_prompt_rows
    from alignlab.rewards.scoring import build_reward_role
    from alignlab.rollout.engine import SamplingParams

    if prompts is None:
        raise ConfigError("--reward and --reference evaluate on your own prompts: add --prompts "
                          "FILE (or --prompts world:<task>)")
    rows = read_prompt_rows(prompts, world, limit=n_prompts)
    if not reward and rows.task is None:
        raise ConfigError(f"--reward: {prompts} has no gold reward; name one (`alignlab list "
                          "rewards`, module:function or ./file.py:function)")
    spec = parse_reward_spec(reward) if reward else "gold"
    params = _reward_params(reward_params)
    rewards = build_reward_role(spec, rows.task, params=params, field="--reward")
    max_new = max_new_tokens or (rows.task.max_new_tokens if rows.task is not None
                                 else DEFAULT_MAX_NEW_TOKENS)
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new,
                              n=samples_per_prompt, seed=seed)
    policy, tokenizer = load_policy(ModelSection(name_or_path=model), world)
    device = pick_device("auto")
    policy.to(device)
    ref = load_reference(reference, tokenizer, world, device) if reference else None
    result = evaluate_user(policy, tokenizer, rows, rewards, sampling, reference=ref)
    result["config"].update(model=model, reference=reference)
    path = write_report(result, out)
    table = Table(title=f"eval {model} on {prompts}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        table.add_row(k, f"{v:.4f}")
    console = Console()
    console.print(table)
    console.print(f"wrote {path} and {path.with_suffix('.md')}")


def _reward_params(text: str | None) -> dict[str, dict[str, Any]]:
    if text is None:
        return {}
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--reward-params: not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ConfigError("--reward-params: expected {reward: {parameter: value}}, e.g. "
                          "'{brevity: {max_words: 20}}'")
    return params


__all__ = ["REWARD_HELP", "eval_user", "parse_reward_spec"]
