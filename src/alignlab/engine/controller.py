"""The online controller: one loop under every online algorithm (RL, online preference learning).

Each iteration:

1. ``algorithm.begin_iteration(i)`` (NLPO refreshes its masking policy here);
2. the rollout role samples ``n`` completions for each of the iteration's prompts;
3. ``algorithm.judge`` scores them (rewards, a pairwise judge, ...) and adds metrics;
4. ``algorithm.make_batches`` turns rollouts and judgements into learner ``Units`` (rows of a
   rollout batch with advantages, preference pairs, ...), or None to skip the update;
5. ``learner.update(units)``: epochs × minibatches, one optimizer step each;
6. ``algorithm.after_update`` (PPO's critic learns here), then the rollout role syncs weights.

Logging, progress, checkpoints and exact resume come from ``run.TrainingRun``, shared with the
offline loop; a checkpoint holds the learner's state and ``algorithm.state_dict()``. Prompts
depend only on the iteration and the seed, so resuming needs no data position.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignlab.core.config import TrainSection
from alignlab.core.errors import TrainingError
from alignlab.engine.learner import Learner, Units
from alignlab.engine.loop import TrainResult
from alignlab.engine.prompts import PromptSource
from alignlab.engine.run import TrainingRun
from alignlab.rollout.engine import length_limit_fraction
from alignlab.rollout.role import RolloutRole, Rollouts

Rows = list[dict[str, Any]]


class OnlineAlgorithm(ABC):
    """The hooks of one online algorithm (see the module docstring for when each runs).

    ``judge`` and ``make_batches`` are the algorithm (abstract); the other hooks default to
    nothing."""

    def begin_iteration(self, iteration: int) -> None:
        """Before sampling."""

    @abstractmethod
    def judge(self, rows: Rows, rollouts: Rollouts, metrics: dict[str, float]) -> Any:
        """Score the rollouts (rows are the prompts' data rows, one per prompt)."""

    @abstractmethod
    def make_batches(self, rows: Rows, rollouts: Rollouts, judged: Any,
                     metrics: dict[str, float]) -> Units | None:
        """The learner's units for this iteration, or None when there is nothing to learn."""

    def after_update(self, units: Units, metrics: dict[str, float]) -> None:
        """After the learner's update (metrics may be added)."""

    def progress_info(self, metrics: dict[str, float]) -> str:
        """A short text for the progress bar."""
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""


@dataclass
class OnlineSetup:
    """What the controller drives; the algorithm's own parts live inside ``algorithm``."""

    prompts: PromptSource
    rollout: RolloutRole
    learner: Learner
    algorithm: OnlineAlgorithm
    completions_per_prompt: int
    prompts_per_step: int
    gold: Callable[[list[str], list[str]], list[float]] | None = None
    """The task's gold reward, logged as ``gold_mean`` (never trained on)."""


@dataclass
class OnlineRun:
    """What an online trainer returns: the loop's result and the trained model."""

    result: TrainResult
    model: Any
    tokenizer: Any


def run_online(setup: OnlineSetup, cfg: TrainSection, description: str) -> TrainResult:
    """``cfg.max_steps`` iterations of ``setup.algorithm``; the caller saves the final model."""
    learner, algorithm, rollout = setup.learner, setup.algorithm, setup.rollout
    run = TrainingRun(cfg, learner.model, description)
    start, state = run.resume()
    if state is not None:
        learner.load_state_dict(state["learner"])
        algorithm.load_state_dict(state["algorithm"])

    def trainer_state() -> dict[str, Any]:
        return {"learner": learner.state_dict(), "algorithm": algorithm.state_dict()}

    t_run = time.time()
    updated = 0
    with run.open(start):
        for it in range(start, cfg.max_steps):
            rows = setup.prompts.batch(it, setup.prompts_per_step)
            m: dict[str, float] = {}
            t0 = time.time()
            algorithm.begin_iteration(it)
            rollout.sync_weights()
            rolls = rollout.generate([r["prompt"] for r in rows], setup.completions_per_prompt,
                                     seed=cfg.seed * 7919 + it)
            t1 = time.time()
            judged = algorithm.judge(rows, rolls, m)
            if setup.gold is not None:
                m["gold_mean"] = statistics.fmean(setup.gold(rolls.prompts, rolls.completions))
            _rollout_metrics(rolls, m)
            t2 = time.time()
            units = algorithm.make_batches(rows, rolls, judged, m)
            t3 = time.time()
            if units is None or units.n == 0:
                m["update_skipped"] = 1
            else:
                m.update(learner.update(units))
                algorithm.after_update(units, m)
                updated += 1
            # time_batches: the algorithm's make_batches (old/reference log-probs, advantages)
            m.update({"time_rollout": t1 - t0, "time_reward": t2 - t1, "time_batches": t3 - t2,
                      "time_update": time.time() - t3})
            run.step_done(it + 1, m, algorithm.progress_info(m), trainer_state)
    seconds = time.time() - t_run  # the training loop; loading and the final save excluded
    if updated == 0 and cfg.max_steps > start:
        # A run that never learned must not end like one that did (with a "final" model that
        # is the starting one): the causes are in the metrics (reward_skipped, pairs, ...).
        raise TrainingError(f"no iteration updated the model: all {cfg.max_steps - start} "
                            f"iterations were skipped (nothing scored or judged to learn from); "
                            f"see {run.output_dir / 'metrics.jsonl'}")
    return TrainResult(cfg.max_steps, run.history, run.output_dir, seconds)


def _rollout_metrics(rolls: Rollouts, m: dict[str, float]) -> None:
    m["response_length"] = statistics.fmean(map(len, rolls.completion_ids))
    m["frac_hit_length_limit"] = length_limit_fraction(rolls.finish_reasons)  # warns once a run


__all__ = ["OnlineAlgorithm", "OnlineRun", "OnlineSetup", "run_online"]
