"""``train.placement: ray``: the online controller's roles as Ray actor groups.

verl/HybridFlow's split (Sheng et al. 2024, "HybridFlow: A Flexible and Efficient RLHF
Framework"): one *single controller* runs the algorithm's loop and talks to groups of workers
through plain data; OpenRLHF (Hu et al. 2024) places the same roles as Ray actors. Here:

- **controller and trainer**: this process. ``run_online`` and the algorithm's hooks run
  unchanged, and so does everything that computes gradients or log-probs of the trained model
  (the learner, the reference, PPO's critic).
- **rollout**: ``train.ray.num_rollout_workers`` actors (``RolloutWorker``), each with a copy
  of the policy, behind the rollout backend protocol (``RayBackend``): ``generate`` gives each
  worker a contiguous share of the prompts in whole decode chunks (``rollout.batch_size // n``
  prompts), and every chunk is seeded by its first prompt's index in the batch: the samples
  are those of one process with the same seed, bit for bit where the worker decodes with as
  many threads as the trainer did.
- **reward / judge**: one actor (``RoleHost``) scores: the reward role of the policy-gradient
  trainers, the inner judge of online preference learning (its label budget stays here, where
  the algorithm reads it). ``train.ray.reward_worker: false`` keeps them in this process.
- **weight sync**: ``sync_weights`` (the controller calls it before every rollout) puts the
  weights into Ray's object store once and every worker loads them: the whole state dict at
  the first sync (a resumed run's workers start from the checkpoint), then the trained
  parameters only: all of them in full fine-tuning, the adapters alone under LoRA.

A Ray already initialised in this process (a notebook, a test) is used and left running;
otherwise Ray is started (or joined: ``train.ray.address``) for the run and stopped after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import ray
import torch

from alignlab.core.config import RaySection
from alignlab.core.errors import AlignlabError
from alignlab.core.notices import warn_once
from alignlab.engine.ray_workers import RoleHost, RolloutWorker
from alignlab.rewards.scoring import RewardScores
from alignlab.rollout.backend import Generation
from alignlab.rollout.engine import SamplingParams

log = logging.getLogger(__name__)


def get(refs: Any) -> Any:
    """``ray.get``, raising an alignlab error from an actor as itself (the CLI prints its
    message, not a remote traceback)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, AlignlabError):
            raise cause from None
        raise


def shard_prompts(n_prompts: int, per_chunk: int, workers: int) -> list[range]:
    """Contiguous shares of ``n_prompts`` prompts in whole chunks of ``per_chunk``, as even as
    chunks allow, for at most ``workers`` workers (none empty)."""
    chunks = -(-n_prompts // per_chunk)
    base, extra = divmod(chunks, workers)
    shares, start = [], 0
    for w in range(min(workers, chunks)):
        stop = min(n_prompts, start + (base + (w < extra)) * per_chunk)
        shares.append(range(start, stop))
        start = stop
    return shares


def eos_and_pad(tokenizer: Any) -> tuple[int | None, int]:
    """The eos id and the pad id the rollout role samples with (pad: eos when there is none)."""
    eos = tokenizer.eos_token_id
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)


def sync_payload(model: torch.nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """What a weight sync sends, on the CPU: with ``full`` the whole state dict, else the
    trained parameters (``requires_grad``): every weight in full fine-tuning, the LoRA adapters
    alone when the rest is frozen."""
    if full:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}


class RayBackend:
    """A rollout backend (``rollout/backend.py``) whose sampling runs on rollout workers (see
    the module docstring); the rollout role keeps tokenizing, decoding and ``to_batch``."""

    name = "ray"

    def __init__(self, workers: Sequence[Any], batch_size: int) -> None:
        self.workers, self.batch_size = list(workers), batch_size
        self.syncs = 0
        self.last_sync: list[str] = []
        """The names the last sync sent (the adapters alone under LoRA, after the first)."""

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Send ``policy``'s weights to every rollout worker (object store: one copy)."""
        payload = sync_payload(policy, full=self.syncs == 0)
        ref = ray.put(payload)
        get([w.load_weights.remote(ref) for w in self.workers])
        self.syncs += 1
        self.last_sync = sorted(payload)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        per_chunk = max(1, self.batch_size // params.n)
        shares = shard_prompts(len(prompt_ids), per_chunk, len(self.workers))
        if len(shares) < len(self.workers) and params.temperature > 0:  # not ReMax's greedy pass
            warn_once("ray-idle-workers", (
                f"only {len(shares)} of {len(self.workers)} rollout workers sample: a worker "
                f"takes whole decode chunks of rollout.batch_size // rollout.n = {per_chunk} "
                f"prompts, and there are {len(prompt_ids)}; lower rollout.batch_size to use "
                f"them all"))
        parts = get([w.generate.remote(prompt_ids[s.start:s.stop],
                                       replace(params, first_prompt=params.first_prompt + s.start))
                     for w, s in zip(self.workers, shares)])
        return Generation([c for part in parts for c in part[0]],
                          [r for part in parts for r in part[1]],
                          [lp for part in parts for lp in part[2]])

    def worker_weights(self) -> list[dict[str, torch.Tensor]]:
        """Each worker's whole state dict (checks and tests)."""
        return get([w.weights.remote() for w in self.workers])


class RemoteRewardRole:
    """The reward role on the reward worker: ``score`` runs there; the count of skipped samples
    is kept here, where the algorithm checkpoints it."""

    def __init__(self, host: Any, key: str) -> None:
        self.host, self.key = host, key
        self.total_skipped = 0

    def score(self, prompts: list[str], completions: list[str],
              fields: Mapping[str, list[Any]] | None = None,
              completion_ids: list[list[int]] | None = None) -> RewardScores:
        scored = get(self.host.call.remote(self.key, "score", prompts, completions,
                                           dict(fields or {}), completion_ids))
        self.total_skipped += scored.skipped
        return scored


class RemoteJudge:
    """A pairwise judge on the reward worker. ``cached``, ``counters`` and ``load_counters``
    exist here only where the judge there has them (``BudgetedJudge`` and ``Labeller`` ask
    with getattr/hasattr; the first such question asks the worker)."""

    OPTIONAL = ("cached", "counters", "load_counters")

    def __init__(self, host: Any, key: str) -> None:
        self.host, self.key = host, key
        self._methods: list[str] | None = None

    def judge(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[Any]:
        return get(self.host.call.remote(self.key, "judge", list(prompts), list(a), list(b)))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in RemoteJudge.OPTIONAL or "host" not in self.__dict__:
            raise AttributeError(name)
        if self._methods is None:
            self._methods = get(self.host.methods.remote(self.key, RemoteJudge.OPTIONAL))
        if name not in self._methods:
            raise AttributeError(name)

        def call(*args: Any) -> Any:
            return get(self.host.call.remote(self.key, name, *args))
        return call


class RayPlacement:
    """Ray actor groups for the roles (see the module docstring); ``with placement:`` waits
    until every worker is built, and stops them (and a Ray it started) at the end."""

    name = "ray"

    def __init__(self, section: RaySection, *, device: str, trainer: str) -> None:
        self.section, self.device, self.trainer = section, device, trainer
        self.started = not ray.is_initialized()
        if self.started:
            local = section.address is None
            ray.init(address=section.address,
                     num_cpus=section.num_cpus if local else None,
                     object_store_memory=(section.object_store_memory_mb << 20
                                          if local and section.object_store_memory_mb else None),
                     runtime_env=section.runtime_env or None, include_dashboard=False,
                     logging_level=logging.WARNING)
        self.actors: list[Any] = []
        self.pending: list[Any] = []
        self.host: Any = None
        self.keys = 0
        self.entered = False

    def rollout_backend(self, policy_factory: Callable[[], Any], tokenizer: Any, *,
                        batch_size: int, local: Callable[[], Any] | None = None) -> RayBackend:
        """A backend sampling on ``num_rollout_workers`` actors whose policies
        ``policy_factory`` builds (the trainer's loader: the same architecture; the weights
        come with the first sync). ``local`` (the backend of a local run) is not built."""
        s = self.section
        eos, pad = eos_and_pad(tokenizer)
        actor = ray.remote(RolloutWorker).options(num_cpus=s.num_cpus_per_worker,
                                                  num_gpus=s.num_gpus_per_worker)
        workers = [actor.remote(max(1, int(s.num_cpus_per_worker)))
                   for _ in range(s.num_rollout_workers)]
        self.actors += workers
        factory = ray.put(policy_factory)
        self.pending += [w.build.remote(factory, eos_token_id=eos, pad_token_id=pad,
                                        batch_size=batch_size, device=self.device)
                         for w in workers]
        return RayBackend(workers, batch_size)

    def rewards(self, factory: Callable[[], Any]) -> Any:
        """The reward role ``factory`` builds, on the reward worker."""
        if not self.section.reward_worker:
            return factory()
        key = self._build(factory)  # starts the reward worker on first use
        return RemoteRewardRole(self.host, key)

    def judge(self, factory: Callable[[], Any]) -> Any:
        """The pairwise judge ``factory`` builds, on the reward worker."""
        if not self.section.reward_worker:
            return factory()
        key = self._build(factory)  # starts the reward worker on first use
        return RemoteJudge(self.host, key)

    def _build(self, factory: Callable[[], Any]) -> str:
        if self.host is None:
            s = self.section
            actor = ray.remote(RoleHost).options(num_cpus=s.reward_num_cpus,
                                                 num_gpus=s.reward_num_gpus)
            self.host = actor.remote(max(1, int(s.reward_num_cpus)))
            self.actors.append(self.host)
        key = f"role-{self.keys}"
        self.keys += 1
        self.pending.append(self.host.build.remote(key, factory))
        if self.entered:
            self._wait()
        return key

    def _wait(self) -> None:
        pending, self.pending = self.pending, []
        get(pending)

    def __enter__(self) -> RayPlacement:
        t0 = time.time()
        self._wait()
        self.entered = True
        s = self.section
        log.info("%s placement: ray (%s): %d rollout workers x %g CPU %g GPU, reward worker "
                 "%s; ready in %.0fs", self.trainer, s.address or "a Ray started for this run",
                 s.num_rollout_workers, s.num_cpus_per_worker, s.num_gpus_per_worker,
                 "on" if s.reward_worker else "off", time.time() - t0)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors, and Ray when this placement started it."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.pending, self.host = [], [], None
        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False


__all__ = ["RayBackend", "RayPlacement", "RemoteJudge", "RemoteRewardRole", "get",
           "shard_prompts", "sync_payload"]
