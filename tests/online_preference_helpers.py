"""Shared by the tests of the online preference algorithms (``tests/test_online_preference_*``):
a tiny-world config, the base model's eval gold (computed once), and the kill-and-resume check
of ``tests/test_online_dpo.py`` made generic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from alignlab.algorithms.registry import ALGORITHMS
from alignlab.core.config import EvalSection, OnlineTrainSection, RolloutSection, WorldSection
from alignlab.eval.evaluate import evaluate
from alignlab.models.loading import load_model, load_tokenizer

EVAL = EvalSection(task="positive", n_prompts=32, samples_per_prompt=2, seed=11)


def config(name: str, world_cache: str, out: Path | str, *, steps: int, prompts: int = 8,
           n: int = 4, lr: float = 1e-3, max_new_tokens: int | None = None, seed: int = 0,
           **section: Any) -> Any:
    """A ``positive``-task config of algorithm ``name`` on the tiny world, gold judge."""
    cls = ALGORITHMS.get(name).config_cls
    section_cls = cls.model_fields[name].annotation
    return cls(world=WorldSection(preset="tiny", cache_dir=world_cache),
               train=OnlineTrainSection(output_dir=str(out), max_steps=steps, lr=lr,
                                        batch_size=32, progress=False, tensorboard=False,
                                        seed=seed),
               rollout=RolloutSection(prompts="world:positive", prompts_per_step=prompts, n=n,
                                      max_new_tokens=max_new_tokens),
               **{name: section_cls(**section)})


_BASE_GOLD: dict[str, float] = {}


def base_gold(world: Any) -> float:
    """The base model's eval gold on ``positive`` (once per test session)."""
    key = str(world.base_dir)
    if key not in _BASE_GOLD:
        base, tok = load_model(key), load_tokenizer(key)
        _BASE_GOLD[key] = evaluate(base, tok, world.task("positive"), EVAL)["metrics"]["gold_mean"]
    return _BASE_GOLD[key]


def eval_gold(run: Any, world: Any) -> float:
    return evaluate(run.model, run.tokenizer, world.task("positive"), EVAL)["metrics"]["gold_mean"]


def metrics_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def resumes_exactly(name: str, algorithm_cls: type, make_cfg: Any, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch, steps: int = 3) -> None:
    """A run killed mid-iteration 3 (after the step-2 checkpoint) and resumed ends with the
    weights and label count of an uninterrupted run (``test_online_dpo.py``'s check)."""
    train = ALGORITHMS.get(name).run

    def cfg(out: Path) -> Any:
        c = make_cfg(out, steps)
        c.train.save_every = 1
        return c

    full = train(cfg(tmp_path / "a"))
    real, calls = algorithm_cls.make_batches, []

    def killed_in_iteration_3(self: Any, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(algorithm_cls, "make_batches", killed_in_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "b"))
    monkeypatch.setattr(algorithm_cls, "make_batches", real)
    resumed_cfg = cfg(tmp_path / "b")
    resumed_cfg.train.resume = True
    resumed = train(resumed_cfg)
    assert resumed.result.history[0]["step"] == 3
    assert resumed.result.history[-1]["labels_total"] == full.result.history[-1]["labels_total"]
    for key in ("win_rate_gold", "kl_ref"):
        assert resumed.result.history[-1].get(key) == pytest.approx(
            full.result.history[-1].get(key), abs=1e-5), key
    for (param, a), b in zip(full.model.state_dict().items(),
                             resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=param)
