"""Short tiny-world runs of the four trainer families for the invariant tests
(``tests/test_invariants_*.py``): configurations that must train the same, run once each and
compared on their per-step losses and final weights.

A run is named by its family and options; ``FamilyRuns.run`` memoises it for the session, so
the baseline every invariant compares against trains once. Losses are read unrounded from
``TrainingRun.step_done`` (``metrics.jsonl`` keeps 6 decimals), together with the log-prob paths
that ran (``fast_path``'s names), so a test can check it compared what it claims to.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import alignlab.models.fast_path as fast_path_module
import alignlab.models.logprobs as logprobs
from alignlab.core.config import DataSection, TrainSection, WorldSection
from alignlab.engine.run import TrainingRun

FAMILIES = ("sft", "dpo", "reward", "grpo")
UNITS_PER_STEP = 8  # examples (sft), pairs (dpo, reward) or completions (grpo) per optimizer step
STEPS = 4
LR = 1e-3

# Tolerances of configurations that differ only in the order or the kernels of float32
# operations; in brackets the largest value measured over every test here (4 steps, lr 1e-3).
# - LOSS_TOL, each step, relative to max(1, |loss|): losses are O(1) (SFT ~1, DPO and reward
#   ~ln 2, GRPO ~1e-2; the squared online losses up to O(100))
#   and differ by float32 rounding [4e-7].
LOSS_TOL = 1e-5
# - except INPO's: per pair (h ∓ η/2)², h a difference of six sequence log-prob sums whose
#   rounding is absolute (~1e-5 nats: the sums are O(10–100)), so the loss rounds by ~η·δh a
#   pair against a loss of ~(η/2)² a pair at the start (h ≈ 0), not relative to its size
#   [sharded on 2 processes against one: 4.4e-5 with AVX-512's kernels, 2.4e-6 with AVX2's].
LOSS_TOL_BY_FAMILY = {"inpo": 1e-4}
# - UPDATE_TOL, each weight tensor: ‖w_a − w_b‖ / ‖w_a − w_start‖, the difference relative to
#   how far training moved it [accumulation 1e-4; layouts and fast paths 8e-4]. A per-micro-batch
#   normaliser (the mean of micro-batch means) gives 0.26 to 0.78.
UPDATE_TOL = 1e-2
# - WEIGHT_TOL, any one coordinate [1.4e-4 = 0.14·lr]: AdamW steps lr·m/(√v + ε), so a
#   coordinate whose gradient is near zero takes a step of a sizeable fraction of lr driven by
#   the rounding noise of that gradient, which differs between the runs (SFT padded vs packed:
#   one k_proj coordinate 3e-5 apart, the fifth largest of that tensor 8e-8). At most lr.
WEIGHT_TOL = LR
# - METRIC_TOL, relative to max(1, |value|), each step, the family's METRICS [7e-6].
METRIC_TOL = 1e-4


class Killed(Exception):
    """Raised after a chosen step, as a crash or a kill would stop the run."""


# Logged metrics that are means over the loss's items or over the whole batch, so invariant as
# the loss is; not reward-model accuracy, a count that a rounding difference could flip.
METRICS = {"sft": ("grad_norm", "nll_per_token"),
           "dpo": ("grad_norm", "logps/chosen", "logps/rejected", "kl_proxy"),
           "reward": ("grad_norm", "chosen_reward", "rejected_reward"),
           "grpo": ("grad_norm", "reward_mean", "kl_ref", "kl"),
           "online_dpo": ("grad_norm", "logps/chosen", "logps/rejected", "kl_ref",
                          "win_rate_gold"),
           "ppo": ("grad_norm", "reward_mean", "critic_loss", "critic_grad_norm",
                   "value_rollout_mean", "explained_variance"),
           "ppo_shared": ("grad_norm", "reward_mean", "value_loss", "value_rollout_mean",
                          "explained_variance"),
           "nlpo": ("grad_norm", "reward_mean", "critic_loss", "critic_grad_norm",
                    "value_rollout_mean"),
           "preference_model": ("grad_norm", "position_bias", "p_chosen_mean")}


@dataclass
class Outcome:
    family: str
    metrics: dict[int, dict[str, Any]]  # step (iteration for grpo) -> logged metrics, unrounded
    start: dict[str, torch.Tensor]  # the trained model's weights before the first step
    weights: dict[str, torch.Tensor]  # and after the last
    paths: set[str] = field(default_factory=set)  # fast_path names taken by the log-prob calls
    output_dir: str = ""  # the run directory (final/, checkpoints/)

    @property
    def losses(self) -> dict[int, float]:
        return {step: m["loss"] for step, m in self.metrics.items()}


@dataclass(frozen=True)
class Options:
    micro: int = UNITS_PER_STEP  # micro-batch: train.batch_size
    accum: int = 1  # micro-batches per optimizer step
    packing: bool = False  # data.packing (sft, dpo, reward)
    sharing: bool | None = None  # preference.prefix_sharing (dpo) / rl.prefix_sharing (grpo)
    fast: bool = True  # models.logprobs fast paths on
    share_small: bool = False  # MIN_SKIPPED_TOKENS = 0: flat batches share even tiny prompts
    steps: int = STEPS
    save_every: int | None = None
    rollout_batch: int = 64  # rollout.batch_size (grpo): rows sampled by one generator


def _train(out: Path, o: Options, resume: bool = False) -> TrainSection:
    return TrainSection(output_dir=str(out), max_steps=o.steps, lr=LR, precision="fp32",
                        device="cpu", log_every=1, save_every=o.save_every, resume=resume,
                        progress=False, tensorboard=False, seed=3, warmup_steps=1,
                        lr_scheduler="cosine", batch_size=o.micro, grad_accum=o.accum)


def _data(o: Options) -> DataSection:
    # 32 rows = 4 optimizer steps of 8: one epoch, the same rows in every split.
    return DataSection(source="world:positive", limit=32, max_length=64, packing=o.packing)


def _sft(world: WorldSection, train: TrainSection, o: Options) -> tuple[Any, Callable]:
    from alignlab.algorithms.sft import SFTConfig, run_sft

    return SFTConfig(data=_data(o), train=train, world=world), run_sft


def _dpo(world: WorldSection, train: TrainSection, o: Options) -> tuple[Any, Callable]:
    from alignlab.algorithms.preference.trainer import (
        PreferenceConfig,
        PreferenceSection,
        run_preference,
    )

    return PreferenceConfig(data=_data(o), train=train, world=world, preference=PreferenceSection(
        loss="dpo", prefix_sharing=o.sharing)), run_preference


def _reward(world: WorldSection, train: TrainSection, o: Options) -> tuple[Any, Callable]:
    from alignlab.algorithms.reward_model.trainer import RewardConfig, RewardSection, run_reward

    return RewardConfig(data=_data(o), train=train, world=world,
                        reward=RewardSection(eval_fraction=0.0)), run_reward


def _preference_model(world: WorldSection, train: TrainSection, o: Options
                      ) -> tuple[Any, Callable]:
    from alignlab.algorithms.preference_model.trainer import (
        PreferenceModelConfig,
        run_preference_model,
    )

    # 32 pairs, each in both orders: 4 steps of 8 pairs (16 ordered sequences)
    return PreferenceModelConfig(data=_data(o), train=train, world=world,
                                 preference_model={"eval_fraction": 0.0}), run_preference_model


def _grpo(world: WorldSection, train: TrainSection, o: Options) -> tuple[Any, Callable]:
    from alignlab.algorithms.policy_gradient.config import OnlineRLConfig, RLSection
    from alignlab.algorithms.policy_gradient.run import train_policy_gradient
    from alignlab.core.config import RolloutSection

    # 4 prompts x 4 completions = 16 rows an iteration, two optimizer steps of 8; the KL term
    # brings in the reference's log-probs, two steps the old policy's (both micro-batched). The
    # token mean (DAPO) is the aggregation whose normaliser spans micro-batches of unequal token
    # counts: the one a per-micro-batch mean would get wrong (GRPO's own averages sequences).
    # Runs compared here sample the same completions only while no rounding difference flips a
    # sampled token; with these seeds none does (another seed or BLAS might: the losses and
    # rewards would then differ at once, not by rounding).
    rl = RLSection(kl_coef=0.05, minibatch_size=o.micro * o.accum, loss_aggregation="token_mean",
                   prefix_sharing=o.sharing is not False)
    cfg = OnlineRLConfig(world=world, train=train.model_copy(update={"grad_accum": 1}),
                         rollout=RolloutSection(prompts="world:positive", prompts_per_step=4, n=4,
                                                max_new_tokens=16, batch_size=o.rollout_batch),
                         rl=rl)
    return cfg, lambda c: train_policy_gradient(c, "grpo")


def _online(o: Options, n: int) -> Any:
    from alignlab.core.config import RolloutSection

    return RolloutSection(prompts="world:positive", prompts_per_step=4, n=n, max_new_tokens=16,
                          batch_size=o.rollout_batch)


def _online_dpo(world: WorldSection, train: TrainSection, o: Options) -> tuple[Any, Callable]:
    from alignlab.algorithms.online_preference.online_dpo import (
        OnlineDPOConfig,
        train_online_dpo,
    )

    # 4 prompts x 2 samples = 4 judged pairs an iteration, one optimizer step over all of them
    # in micro-batches of ``micro`` pairs; win rates against the starting model's samples.
    cfg = OnlineDPOConfig(world=world, train=train.model_dump() | {"grad_accum": 1},
                          rollout=_online(o, 2))
    return cfg, train_online_dpo


def _ppo_like(algorithm: str, **rl: Any) -> Callable:
    def build(world: WorldSection, train: TrainSection, o: Options) -> tuple[Any, Callable]:
        from alignlab.algorithms.policy_gradient.config import OnlineRLConfig
        from alignlab.algorithms.policy_gradient.run import train_policy_gradient
        from alignlab.algorithms.registry import ALGORITHMS

        # 4 prompts x 2 completions, one minibatch: one policy step an iteration (and one of
        # the separate critic, a second trained model with its own learner, on the same rows)
        cls: type[OnlineRLConfig] = ALGORITHMS.get(algorithm).config_cls
        cfg = cls(world=world, train=train.model_dump() | {"grad_accum": 1},
                  rollout=_online(o, 2), rl={"kl_coef": 0.05, "minibatch_size": 8, "epochs": 1, **rl})
        return cfg, lambda c: train_policy_gradient(c, algorithm)
    return build


_ppo = _ppo_like("ppo")
# PPO's shared critic: a value head on the policy, trained in the policy's loss and optimizer
_ppo_shared = _ppo_like("ppo", critic="shared")
# NLPO: its masking policy refreshed from the policy every 2 iterations (after 2, and a run
# killed after 3 resumes past it)
_nlpo = _ppo_like("nlpo", nlpo_update_every=2)


# The other online preference trainers, as ``online_dpo`` (4 prompts x 2 samples); the extra
# section fields exercise a part the defaults leave out (TR-DPO's soft reference refresh) or
# keep every rank with pairs to learn from (DNO's margin filter: a sharded update needs them).
ONLINE_PREFERENCE = {"nash_md": {}, "xpo": {}, "vpo": {}, "sppo": {}, "dno": {"margin": 0.0}, "inpo": {},
                     "selm": {}, "p3o": {}, "iterative_dpo": {"reference_refresh": "soft"},
                     "egpo": {}}


def _online_preference(name: str) -> Callable:
    def build(world: WorldSection, train: TrainSection, o: Options) -> tuple[Any, Callable]:
        from alignlab.algorithms.registry import ALGORITHMS

        entry = ALGORITHMS.get(name)
        cfg = entry.config_cls(world=world, train=train.model_dump() | {"grad_accum": 1},
                               rollout=_online(o, 2), **{name: ONLINE_PREFERENCE[name]})
        return cfg, entry.run
    return build


BUILDERS = {"sft": _sft, "dpo": _dpo, "reward": _reward, "grpo": _grpo,
            "online_dpo": _online_dpo, "ppo": _ppo, "ppo_shared": _ppo_shared, "nlpo": _nlpo,
            "preference_model": _preference_model,
            **{name: _online_preference(name) for name in ONLINE_PREFERENCE}}
METRICS.update({name: ("grad_norm", "kl_ref") for name in ONLINE_PREFERENCE})


@contextlib.contextmanager
def _one_thread():
    # The tiny model's matmuls gain nothing from a second thread, and on shared cores two
    # threads spin-waiting for each other cost several times the CPU (measured 7x under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights; a model sharded by FSDP2 or ZeRO-3 gathers them (every rank calls
    this)."""
    from torch.distributed.tensor import DTensor

    from alignlab.engine import zero3

    if zero3.partitioned(model):
        return {k: v.clone() for k, v in zero3.state_dict(model, everywhere=True).items()}

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in model.state_dict().items()}


class FamilyRuns:
    """Runs of the four families on the tiny world, memoised by (family, options)."""

    def __init__(self, world_cache: str, root: Path) -> None:
        self.world = WorldSection(preset="tiny", cache_dir=world_cache)
        self.root, self.cache = root, {}
        self.count = itertools.count()

    def run(self, family: str, **options: Any) -> Outcome:
        o = Options(**options)
        key = (family, o)
        if key not in self.cache:
            self.cache[key] = self._run(family, o, self.root / f"{family}-{next(self.count)}")
        return self.cache[key]

    def resumed(self, family: str, kill_after: int, **options: Any) -> Outcome:
        """Killed after step ``kill_after``, then resumed to the end in the same directory; the
        losses are the killed run's up to its last checkpoint, then the resumed run's."""
        o = Options(**options)
        out = self.root / f"{family}-{next(self.count)}"
        killed = self._run(family, o, out, kill_after=kill_after)
        resumed = self._run(family, o, out, resume=True)
        first = min(resumed.metrics)
        assert first > 1, f"{family}: the resumed run started at step {first}, not at a checkpoint"
        metrics = {s: m for s, m in killed.metrics.items() if s < first} | resumed.metrics
        return Outcome(family, metrics, resumed.start, resumed.weights,
                       killed.paths | resumed.paths, str(out))

    def _run(self, family: str, o: Options, out: Path, *, kill_after: int | None = None,
             resume: bool = False) -> Outcome:
        cfg, run = BUILDERS[family](self.world, _train(out, o, resume), o)
        logged: dict[int, dict[str, Any]] = {}
        paths: set[str] = set()
        trained: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
        real_init, real_done, real_route = (TrainingRun.__init__, TrainingRun.step_done,
                                            logprobs.route)

        def init(run_self, cfg, model, description):
            real_init(run_self, cfg, model, description)
            trained.append((model, _weights(model)))

        def step_done(run_self, step, metrics, info, state):
            real_done(run_self, step, metrics, info, state)
            logged[step] = dict(metrics)
            if step == kill_after:
                raise Killed

        def route(*args, **kwargs):
            path = real_route(*args, **kwargs)
            paths.add(path[0].name)
            return path

        with pytest.MonkeyPatch.context() as mp, contextlib.ExitStack() as stack:
            stack.enter_context(_one_thread())
            mp.setattr(TrainingRun, "__init__", init)
            mp.setattr(TrainingRun, "step_done", step_done)
            mp.setattr(logprobs, "route", route)
            if o.share_small:
                mp.setattr(fast_path_module, "MIN_SKIPPED_TOKENS", 0)
            if not o.fast:
                stack.enter_context(logprobs.fast_paths_off("invariant test: fast paths off"))
            try:
                run(cfg)
            except Killed:
                pass
        (model, start), = trained  # one TrainingRun: no ensemble members here (PPO's
        # critic has its own Learner, not a TrainingRun)
        return Outcome(family, logged, start, _weights(model), paths, str(out))


@dataclass
class Difference:
    loss: float  # max |Δ loss| over the steps
    update: float  # max over weight tensors of ‖Δ w‖ / ‖w_final − w_start‖
    weight: float  # max |Δ w| over every coordinate (reported; see WEIGHT_TOL)
    metric: float  # max |Δ m| / max(1, |m|) over the steps and the family's METRICS
    worst: str = ""  # where update and metric peak


def difference(a: Outcome, b: Outcome) -> Difference:
    """How far ``b`` trained from ``a``: per-step losses, final weights, invariant metrics."""
    assert a.metrics.keys() == b.metrics.keys(), (sorted(a.metrics), sorted(b.metrics))
    assert a.weights.keys() == b.weights.keys()
    loss = max(abs(a.losses[s] - b.losses[s]) for s in a.metrics)
    deltas = {k: a.weights[k].float() - b.weights[k].float() for k in a.weights}
    weight = max(float(d.abs().max()) for d in deltas.values())
    update = {k: float(d.norm() / (a.weights[k] - a.start[k]).float().norm())
              for k, d in deltas.items() if not torch.equal(a.weights[k], a.start[k])}
    assert update, "no weight moved in training: the comparison would be vacuous"
    metric = {f"{k}@{s}": abs(a.metrics[s][k] - b.metrics[s][k]) / max(1.0, abs(a.metrics[s][k]))
              for s in a.metrics for k in METRICS[a.family]}
    worst_update, worst_metric = max(update, key=update.get), max(metric, key=metric.get)
    return Difference(loss, update[worst_update], weight, metric[worst_metric],
                      f"{worst_update}, {worst_metric}")


def assert_equivalent(a: Outcome, b: Outcome) -> Difference:
    """``a`` and ``b`` trained the same up to the tolerances (the update relative to how far
    training moved the weights, so a run that did not train cannot pass vacuously). Losses are
    compared relative to max(1, |loss|): the squared losses (SPPO, INPO, EGPO's online IPO)
    reach O(100), the others are O(1) or below, where this is the absolute difference."""
    d = difference(a, b)
    print(f"measured {d}")  # shown by pytest -rP
    loss = relative_loss(a, b)
    assert loss <= loss_tolerance(a.family) and d.update <= UPDATE_TOL, (loss, d)
    assert d.weight <= WEIGHT_TOL and d.metric <= METRIC_TOL, d
    return d


def relative_loss(a: Outcome, b: Outcome) -> float:
    """The largest per-step loss difference of ``a`` and ``b``, relative to max(1, |loss|)."""
    return max(abs(a.losses[s] - b.losses[s]) / max(1.0, abs(a.losses[s])) for s in a.metrics)


def loss_tolerance(family: str) -> float:
    """:data:`LOSS_TOL`, or the family's own where its loss rounds otherwise
    (:data:`LOSS_TOL_BY_FAMILY`)."""
    return LOSS_TOL_BY_FAMILY.get(family, LOSS_TOL)


def run_plan_on_ranks(runs: FamilyRuns, plan: list[list], out: Path,
                      outcomes: dict[str, object]) -> None:
    """The distributed workers' loop: each ``[name, family, options, kill_after]`` of ``plan``
    run (or killed and resumed) on every rank, rank 0 saving ``outcomes`` to
    ``out/outcomes.pt``; then the process group is shut down."""
    import dataclasses

    from alignlab.engine import distributed

    for name, family, options, kill_after in plan:
        outcome = (runs.resumed(family, kill_after, **options) if kill_after
                   else runs.run(family, **options))
        outcomes[name] = dataclasses.asdict(outcome) | {"world_size": distributed.world_size()}
    if distributed.is_main():
        torch.save(outcomes, out / "outcomes.pt")
    distributed.shutdown()
