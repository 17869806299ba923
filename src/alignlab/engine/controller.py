"""The online controller: one loop under every online algorithm (RL, online preference learning).

Each iteration:

1. ``algorithm.begin_iteration(i)`` (NLPO refreshes its masking policy here);
2. the rollout role samples ``n`` completions for each of the iteration's prompts (after syncing
   its backend with the policy; with ``max_staleness`` s >= 1 they were sampled ahead by a
   background thread from the weights of s iterations ago: ``async_rollout.py``);
3. ``algorithm.judge`` scores them (rewards, a pairwise judge, ...) and adds metrics;
4. ``algorithm.make_batches`` turns rollouts and judgements into learner ``Units`` (rows of a
   rollout batch with advantages, preference pairs, ...), or None to skip the update;
5. ``learner.update(units)``: epochs × minibatches, one optimizer step each;
6. ``algorithm.after_update`` (PPO's critic learns here).

Logging, progress, checkpoints and exact resume come from ``run.TrainingRun``, shared with the
offline loop; a checkpoint holds the learner's state and ``algorithm.state_dict()``. Prompts
depend only on the iteration and the seed, so resuming needs no data position.

With N processes (``engine/distributed.py``) every rank takes a contiguous ``1/N`` of the
iteration's prompts and samples, judges and builds units for them alone: a prompt's group of
completions never spans two ranks. The learner trains on all ranks' units as one batch; the
iteration's metrics are averaged over the ranks (counts summed, ``SUMMED``). A checkpoint holds
rank 0's state and each rank's ``rank_state_dict`` (its own counters) and rollouts sampled
ahead.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from alignlab.core.config import TrainSection
from alignlab.core.errors import ConfigError, TrainingError
from alignlab.core.heap import release_free_heap
from alignlab.engine import distributed, sharding
from alignlab.engine.async_rollout import rollout_source
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

    trains_in_make_batches = False
    """True for an algorithm whose ``make_batches`` runs an update of its own (EGPO's
    extrapolation step): under FSDP2 and ZeRO-3 it then runs outside the gathered weights (no
    backward may run inside), and gathers what it samples or scores itself with :func:`gathered`."""

    @abstractmethod
    def make_batches(self, rows: Rows, rollouts: Rollouts, judged: Any,
                     metrics: dict[str, float]) -> Units | None:
        """The learner's units for this iteration, or None when there is nothing to learn."""

    def after_update(self, units: Units, metrics: dict[str, float]) -> None:
        """After the learner's update (metrics may be added)."""

    def progress_info(self, metrics: dict[str, float]) -> str:
        """A short text for the progress bar."""
        return ""

    def scoring_models(self) -> list[Any]:
        """Trained models besides the learner's that the hooks run no-grad forwards through (a
        separate critic's values): under FSDP2 they are gathered with the policy (``sharding``)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""

    def rank_state_dict(self) -> dict[str, Any]:
        """The part of the state that differs between processes (counters of this rank's
        prompts); with N processes each rank's is saved and restored to it."""
        return {}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``rank_state_dict`` saved (after ``load_state_dict``)."""


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
    max_staleness: int = 0
    """Rollouts sampled this many updates ahead by a background thread (``async_rollout.py``)."""


@dataclass
class OnlineRun:
    """What an online trainer returns: the loop's result and the trained model."""

    result: TrainResult
    model: Any
    tokenizer: Any


def run_online(setup: OnlineSetup, cfg: TrainSection, description: str) -> TrainResult:
    """``cfg.max_steps`` iterations of ``setup.algorithm``; the caller saves the final model."""
    learner, algorithm, rollout = setup.learner, setup.algorithm, setup.rollout
    part = distributed.share(setup.prompts_per_step, "prompts per step",
                             "rollout.prompts_per_step")
    run = TrainingRun(cfg, learner.model, description)
    rollout.prompt_offset = part.start or 0  # its samples are seeded by their global index
    source = rollout_source(rollout, setup.prompts, setup.completions_per_prompt,
                            setup.prompts_per_step, cfg.seed, setup.max_staleness, part=part)
    start, state = run.resume()
    if state is not None:
        learner.load_state_dict(state["learner"])
        algorithm.load_state_dict(state["algorithm"])
        _load_rank_state(algorithm, source, state)

    def trainer_state() -> dict[str, Any]:
        state = {"learner": learner.state_dict(), "algorithm": algorithm.state_dict()}
        if distributed.active():  # each rank's counters and rollouts sampled ahead
            state["ranks"] = distributed.gather({"algorithm": algorithm.rank_state_dict(),
                                                 "rollouts": source.state_dict()})
        else:
            state["rollouts"] = source.state_dict()
        return state

    t_run = time.time()
    updated = 0
    with run.open(start), closing(source):
        for it in range(start, cfg.max_steps):
            rows = setup.prompts.batch(it, setup.prompts_per_step)[part]
            m: dict[str, float] = {}
            t0 = time.time()
            # FSDP2, ZeRO-3: sampling and no-grad scoring run as many forwards as each rank's rows need
            with gathered(learner, algorithm):
                algorithm.begin_iteration(it)
                rolls, staleness = source.get(it, rows)
                release_free_heap()  # the sampler's freed buffers (core/heap.py)
                if setup.max_staleness:
                    m["staleness"] = staleness
                t1 = time.time()
                judged = algorithm.judge(rows, rolls, m)
                if setup.gold is not None:
                    m["gold_mean"] = statistics.fmean(setup.gold(rolls.prompts,
                                                                 rolls.completions))
                _rollout_metrics(rolls, m)
                t2 = time.time()
                if not algorithm.trains_in_make_batches:
                    units = algorithm.make_batches(rows, rolls, judged, m)
            if algorithm.trains_in_make_batches:
                units = algorithm.make_batches(rows, rolls, judged, m)
            t3 = time.time()
            n = units.n if units is not None else 0
            if distributed.active():  # every rank updates, or none does
                n = int(distributed.global_sum([n])[0])
                units = units if units is not None else Units(0, _no_rows)
            if units is None or n == 0:
                m["update_skipped"] = 1
            else:
                m.update(learner.update(units))
                algorithm.after_update(units, m)
                updated += 1
                release_free_heap()  # the update's activations and gradients
            # time_batches: the algorithm's make_batches (old/reference log-probs, advantages)
            m.update({"time_rollout": t1 - t0, "time_reward": t2 - t1, "time_batches": t3 - t2,
                      "time_update": time.time() - t3})
            m = reduce_metrics(m)
            run.step_done(it + 1, m, algorithm.progress_info(m), trainer_state)
    seconds = time.time() - t_run  # the training loop; loading and the final save excluded
    if updated == 0 and cfg.max_steps > start:
        # A run that never learned must not end like one that did (with a "final" model that
        # is the starting one): the causes are in the metrics (reward_skipped, pairs, ...).
        raise TrainingError(f"no iteration updated the model: all {cfg.max_steps - start} "
                            f"iterations were skipped (nothing scored or judged to learn from); "
                            f"see {run.output_dir / 'metrics.jsonl'}")
    return TrainResult(cfg.max_steps, run.history, run.output_dir, seconds)


@contextlib.contextmanager
def gathered(learner: Learner, algorithm: OnlineAlgorithm) -> Iterator[None]:
    """Under FSDP2 and ZeRO-3, the policy's and ``algorithm.scoring_models()``' weights gathered
    on every rank (``sharding.full_weights``; collective, no backward inside); else nothing."""
    with contextlib.ExitStack() as stack:
        for model in (learner.model, *algorithm.scoring_models()):
            stack.enter_context(sharding.full_weights(model))
        yield


# Per-iteration counts (and running totals) of one rank's prompts: summed over the ranks, also
# under a prefix ("win_rate/labels").
SUMMED = frozenset({"pairs", "samples", "online_pairs", "offline_pairs", "reward_skipped",
                    "dropped_groups", "dropped_groups_total", "labels", "labels_total", "ties",
                    "skipped", "dropped_identical", "labels_used", "judge_cache_hits"})


def reduce_metrics(m: dict[str, float]) -> dict[str, float]:
    """One iteration's metrics over the ranks: counts (``SUMMED``) summed, every other value
    averaged over the ranks that logged it. The shares are equal, so a mean over rows or
    groups is the batch's mean while no group is dropped; the learner's metrics are already
    the whole batch's (the same on every rank)."""
    if not distributed.active():
        return m
    parts = distributed.gather(m)
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part[key] for part in parts if key in part]
        summed = key.rsplit("/", 1)[-1] in SUMMED
        out[key] = sum(values) if summed else sum(values) / len(values)
    return out


def _no_rows(idx: Any) -> dict[str, Any]:
    raise AssertionError("a rank without units was asked for a micro-batch")


def _load_rank_state(algorithm: OnlineAlgorithm, source: Any, state: dict[str, Any]) -> None:
    """This rank's own part of the checkpoint (when it was written by as many processes), or
    the one process's rollouts sampled ahead."""
    ranks, size = state.get("ranks"), distributed.world_size()
    if ranks is None:
        if size > 1:
            raise ConfigError(f"train.resume: the checkpoint was written by one process; resume "
                              f"it with one, not {size} (online runs keep per-process state)")
        source.load_state_dict(state.get("rollouts", {}))
        return
    if len(ranks) != size:
        raise ConfigError(f"train.resume: the checkpoint was written by {len(ranks)} processes; "
                          f"resume it with --num-processes {len(ranks)}, not {size}")
    own = ranks[distributed.rank()]
    algorithm.load_rank_state_dict(own["algorithm"])
    source.load_state_dict(own["rollouts"])


def _rollout_metrics(rolls: Rollouts, m: dict[str, float]) -> None:
    m["response_length"] = statistics.fmean(map(len, rolls.completion_ids))
    m["frac_hit_length_limit"] = length_limit_fraction(rolls.finish_reasons)  # warns once a run


__all__ = ["OnlineAlgorithm", "OnlineRun", "OnlineSetup", "gathered", "run_online"]
