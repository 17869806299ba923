"""Where the online controller's rollouts come from: sampled now, or ahead by a background thread.

``rl.max_staleness: s``.

- ``s = 0`` (``SyncRollouts``): iteration k syncs the rollout backend with the policy and
  samples with it, then trains on the samples: on-policy, what the controller always did.
- ``s >= 1`` (``AsyncRollouts``): the rollout of iteration k+s is sampled by a background
  thread while iteration k trains, from the weights of the start of iteration k, so every
  rollout is exactly s updates old (the first s ones: the starting weights, fewer). The
  samples are off-policy by s updates; the policy loss corrects with importance weights
  π_old/π_rollout from the sampler's own log-probs (``rl.rollout_correction``, on by default
  then). Bounded-staleness asynchronous RL as in AReaL (Fu et al. 2025, "AReaL: A Large-Scale
  Asynchronous Reinforcement Learning System for Language Reasoning") and prime-rl's
  ``async_level``; AReaL takes the newest weights ready (staleness <= s), alignlab exactly s,
  so a run is reproducible from its seed.

The thread owns the backend (a copy of the policy for the built-in engine, or vLLM): it syncs
and samples, nothing else touches it. A sync from the live policy happens while the thread is
otherwise idle and before the trainer moves on (s = 1, where it is always idle by then); with
s >= 2 the thread may still be sampling older rollouts, so the trainer hands it a snapshot (a
copy of the trained parameters; frozen ones shared). Torch ops release the GIL, so the thread
overlaps training on CPU too.

A checkpoint holds the rollouts sampled ahead (token ids, log-probs, texts; a few MB), so a
resumed run trains on the same samples as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
from typing import Any

import torch
from torch import nn

from alignlab.engine.prompts import PromptSource
from alignlab.rollout.role import RolloutRole, Rollouts


def rollout_seed(seed: int, iteration: int) -> int:
    """The sampling seed of one iteration's rollout (depends on nothing else)."""
    return seed * 7919 + iteration


class SyncRollouts:
    """``max_staleness: 0``: sync the backend with the policy, then sample (on-policy)."""

    max_staleness = 0

    def __init__(self, role: RolloutRole, prompts: PromptSource, n: int, prompts_per_step: int,
                 seed: int) -> None:
        self.role, self.n, self.seed = role, n, seed

    def get(self, iteration: int, rows: list[dict[str, Any]]) -> tuple[Rollouts, int]:
        """``(rollouts, staleness)`` of ``iteration``, whose prompt rows are ``rows``."""
        self.role.sync_weights()
        return self.role.generate([r["prompt"] for r in rows], self.n,
                                  seed=rollout_seed(self.seed, iteration)), 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing is sampled ahead."""

    def close(self) -> None:
        """No thread to stop."""


class AsyncRollouts:
    """``max_staleness: s >= 1``: rollout j is sampled ahead from the weights of iteration
    max(j − s, first iteration) by a background thread (see the module docstring). With s = 0
    it samples each rollout in the thread only once asked (no overlap): the tests' check that
    the thread, its own copy of the weights and their syncs change nothing."""

    def __init__(self, role: RolloutRole, prompts: PromptSource, n: int, prompts_per_step: int,
                 seed: int, max_staleness: int, part: slice = slice(None)) -> None:
        if max_staleness < 0:
            raise ValueError("AsyncRollouts needs max_staleness >= 0")
        self.role, self.prompts, self.n, self.k = role, prompts, n, prompts_per_step
        self.part = part  # this process's share of each iteration's prompts
        self.seed, self.max_staleness = seed, max_staleness
        self.ready: dict[int, tuple[Rollouts, int]] = {}  # iteration → (rollouts, weights' iteration)
        self.requested: set[int] = set()  # iterations asked for (ready, queued or running)
        self.error: BaseException | None = None
        self.pending = 0  # requests queued or running
        self.cond = threading.Condition()
        self.requests: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self.started = self.closing = False
        self.num_threads = torch.get_num_threads()
        self.thread = threading.Thread(target=self._serve, name="alignlab-rollout", daemon=True)

    # ------------------------------------------------------------------ the trainer's side

    def get(self, iteration: int, rows: list[dict[str, Any]]) -> tuple[Rollouts, int]:
        """``(rollouts, staleness)`` of ``iteration``; then the rollouts up to ``iteration + s``
        not yet asked for are requested from this iteration's weights (the trainer must not
        change the policy before this returns)."""
        if not self.started:
            self.num_threads = torch.get_num_threads()
            self.thread.start()
            self.started = True
        s = self.max_staleness
        if iteration in self.requested:  # sampled ahead: wait first, so the thread goes idle
            rollouts, version = self._wait(iteration)
            self._ask(iteration, range(iteration + 1, iteration + s + 1))
        else:  # the first iteration of a run (or s = 0): today's weights for all of them
            self._ask(iteration, range(iteration, iteration + s + 1))
            rollouts, version = self._wait(iteration)
        return rollouts, iteration - version

    def _ask(self, iteration: int, wanted: range) -> None:
        todo = [j for j in wanted if j not in self.requested]
        if todo:
            self._sync(iteration)
            for j in todo:
                self.requested.add(j)
                self._request("generate", (j, iteration))

    def _sync(self, iteration: int) -> None:
        with self.cond:
            idle = self.pending == 0
        if idle:  # sync from the live policy now, before the trainer changes it
            done = threading.Event()
            self._request("sync", (self.role.model, done))
            done.wait()
            self._raise()
        else:  # the thread still samples older rollouts: give it these weights to keep
            self._request("sync", (_snapshot(self.role.model), None))

    def _request(self, kind: str, payload: Any) -> None:
        with self.cond:
            self.pending += 1
        self.requests.put((kind, payload))

    def _wait(self, iteration: int) -> tuple[Rollouts, int]:
        with self.cond:
            self.cond.wait_for(lambda: iteration in self.ready or self.error is not None)
            self._raise()
            return self.ready.pop(iteration)

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the rollout thread failed: {self.error!r}") from self.error

    def state_dict(self) -> dict[str, Any]:
        """The rollouts sampled ahead (waits for those still running), as plain lists."""
        with self.cond:
            self.cond.wait_for(lambda: self.pending == 0 or self.error is not None)
            self._raise()
            ahead = {str(j): {"version": v, **dataclasses.asdict(r)}
                     for j, (r, v) in self.ready.items()}
        return {"rollouts_ahead": ahead}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for j, row in state.get("rollouts_ahead", {}).items():
            row = dict(row)
            version = int(row.pop("version"))
            self.ready[int(j)] = (Rollouts(**row), version)
            self.requested.add(int(j))

    def close(self) -> None:
        """Stop the thread after what it is doing now (requests still queued are dropped)."""
        self.closing = True
        if self.started and self.thread.is_alive():
            self.requests.put(None)
            self.thread.join()

    # ------------------------------------------------------------------ the thread

    def _serve(self) -> None:
        # A new thread starts with OpenMP's default thread count, not the one set for the run;
        # another count sums in another order, and the samples' log-probs would differ in the
        # last bits from a synchronous run's.
        torch.set_num_threads(self.num_threads)
        while (request := self.requests.get()) is not None:
            kind, payload = request
            produced = None
            try:
                if self.error is None and not self.closing:
                    produced = self._do(kind, payload)
            except BaseException as exc:  # handed to the trainer, which raises it
                with self.cond:
                    self.error = exc
            finally:
                if kind == "sync" and payload[1] is not None:
                    payload[1].set()
                with self.cond:  # ready and idle at once: the trainer sees both or neither
                    if produced is not None:
                        self.ready[payload[0]] = produced
                    self.pending -= 1
                    self.cond.notify_all()

    def _do(self, kind: str, payload: Any) -> tuple[Rollouts, int] | None:
        if kind == "sync":
            self.role.sync_weights(payload[0])
            return None
        j, version = payload
        rows = self.prompts.batch(j, self.k)[self.part]
        return self.role.generate([r["prompt"] for r in rows], self.n,
                                  seed=rollout_seed(self.seed, j)), version


def _snapshot(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s trained parameters (frozen ones shared) that training won't move."""
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo=frozen)


def rollout_source(role: RolloutRole, prompts: PromptSource, n: int, prompts_per_step: int,
                   seed: int, max_staleness: int = 0, *, part: slice = slice(None)
                   ) -> SyncRollouts | AsyncRollouts:
    """``SyncRollouts`` for ``max_staleness`` 0, else ``AsyncRollouts``; ``part``: the share of
    each iteration's prompts this process samples (all of them in one process)."""
    if max_staleness == 0:
        return SyncRollouts(role, prompts, n, prompts_per_step, seed)
    return AsyncRollouts(role, prompts, n, prompts_per_step, seed, max_staleness, part)


__all__ = ["SyncRollouts", "AsyncRollouts", "rollout_source", "rollout_seed"]
