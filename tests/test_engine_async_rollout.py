"""The rollout sources of the online controller (``engine/async_rollout.py``) against a stand-in
rollout role whose single weight *is* the policy's version: which weights each rollout was
sampled from, its staleness, snapshots, errors, and the rollouts a checkpoint keeps."""

from __future__ import annotations

import io
import threading
import time

import pytest
import torch

import alignlab.engine.async_rollout as async_rollout
from alignlab.engine.async_rollout import AsyncRollouts, SyncRollouts, rollout_seed, rollout_source
from alignlab.engine.prompts import PromptSource
from alignlab.rollout.role import Rollouts


class VersionRole:
    """A rollout role whose policy holds one number, the count of updates so far; a sample
    reports the version its backend was synced to and the seed it was drawn with."""

    def __init__(self, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.model = torch.nn.Linear(1, 1, bias=False).requires_grad_(True)
        self.model.weight.data.zero_()
        self.sampler_version: float | None = None
        self.delay, self.fail_at = delay, fail_at
        self.threads: set[str] = set()
        self.syncs = 0

    def sync_weights(self, policy=None) -> None:
        self.threads.add(threading.current_thread().name)
        self.sampler_version = float((policy or self.model).weight.detach())
        self.syncs += 1

    def generate(self, prompts, n, *, seed):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail_at is not None and seed == rollout_seed(0, self.fail_at):
            raise ValueError("sampler exploded")
        v = int(self.sampler_version)
        return Rollouts(prompts=list(prompts), completions=[f"v{v}"] * len(prompts),
                        completion_ids=[[v]] * len(prompts), finish_reasons=["eos"] * len(prompts),
                        prompt_index=list(range(len(prompts))), prompt_ids=[[seed]] * len(prompts),
                        logprobs=[[-0.5]] * len(prompts))

    def train(self) -> None:
        self.model.weight.data += 1


PROMPTS = PromptSource([{"prompt": f"p{i}"} for i in range(5)], seed=0)


def drive(source, role: VersionRole, start: int, stop: int) -> list[tuple[int, int, int]]:
    """(iteration, version sampled, staleness) of each iteration, training once after each."""
    out = []
    for it in range(start, stop):
        rolls, staleness = source.get(it, PROMPTS.batch(it, 2))
        assert rolls.prompts == [r["prompt"] for r in PROMPTS.batch(it, 2)]
        assert rolls.prompt_ids[0] == [rollout_seed(0, it)]
        out.append((it, rolls.completion_ids[0][0], staleness))
        role.train()
    return out


@pytest.mark.parametrize("s", [1, 2, 3])
def test_rollout_j_is_sampled_from_the_weights_of_iteration_j_minus_s(s):
    role = VersionRole(delay=0.01)
    source = AsyncRollouts(role, PROMPTS, 1, 2, seed=0, max_staleness=s)
    try:
        got = drive(source, role, 0, 7)
    finally:
        source.close()
    assert got == [(j, max(j - s, 0), min(j, s)) for j in range(7)]
    assert role.threads == {"alignlab-rollout"}  # only the thread touches the backend
    assert not source.thread.is_alive()


def test_staleness_zero_samples_each_rollout_from_todays_weights():
    role = VersionRole()
    source = AsyncRollouts(role, PROMPTS, 1, 2, seed=0, max_staleness=0)
    try:
        assert drive(source, role, 0, 4) == [(j, j, 0) for j in range(4)]
    finally:
        source.close()
    sync = SyncRollouts(VersionRole(), PROMPTS, 1, 2, seed=0)
    assert drive(sync, sync.role, 0, 4) == [(j, j, 0) for j in range(4)]
    assert sync.role.threads == {threading.current_thread().name}
    assert isinstance(rollout_source(role, PROMPTS, 1, 2, 0, 0), SyncRollouts)
    assert isinstance(rollout_source(role, PROMPTS, 1, 2, 0, 2), AsyncRollouts)


def test_a_busy_thread_gets_a_snapshot_an_idle_one_the_live_weights(monkeypatch):
    snapshots = []
    real = async_rollout._snapshot
    monkeypatch.setattr(async_rollout, "_snapshot",
                        lambda m: snapshots.append(float(m.weight.detach())) or real(m))
    role = VersionRole(delay=0.05)  # slow sampling: with s = 2 the thread is busy when asked
    source = AsyncRollouts(role, PROMPTS, 1, 2, seed=0, max_staleness=2)
    try:
        got = drive(source, role, 0, 5)
    finally:
        source.close()
    assert got == [(j, max(j - 2, 0), min(j, 2)) for j in range(5)]
    assert snapshots == [1.0, 2.0, 3.0, 4.0]  # every iteration after the first
    # s = 1: the rollout asked for is the one awaited, so the thread is always idle by then
    snapshots.clear()
    role = VersionRole(delay=0.05)
    source = AsyncRollouts(role, PROMPTS, 1, 2, seed=0, max_staleness=1)
    try:
        drive(source, role, 0, 4)
    finally:
        source.close()
    assert snapshots == [] and role.syncs == 4


def test_an_error_in_the_thread_is_raised_by_the_trainer():
    role = VersionRole(fail_at=2)
    source = AsyncRollouts(role, PROMPTS, 1, 2, seed=0, max_staleness=1)
    try:
        with pytest.raises(RuntimeError, match="rollout thread failed.*sampler exploded"):
            drive(source, role, 0, 4)
    finally:
        source.close()


def test_a_checkpoint_keeps_the_rollouts_sampled_ahead_and_resumes_the_same_sequence():
    role = VersionRole(delay=0.01)
    whole = AsyncRollouts(role, PROMPTS, 1, 2, seed=0, max_staleness=2)
    try:
        expected = drive(whole, role, 0, 6)
    finally:
        whole.close()

    role = VersionRole(delay=0.01)
    first = AsyncRollouts(role, PROMPTS, 1, 2, seed=0, max_staleness=2)
    try:
        head = drive(first, role, 0, 3)
        state = first.state_dict()
    finally:
        first.close()
    assert sorted(state["rollouts_ahead"]) == ["3", "4"]
    assert [state["rollouts_ahead"][j]["version"] for j in ("3", "4")] == [1, 2]
    buffer = io.BytesIO()
    torch.save({"rollouts": state}, buffer)  # as a checkpoint stores it
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["rollouts"]

    resumed_role = VersionRole(delay=0.01)
    resumed_role.model.weight.data.fill_(3.0)  # the checkpoint's weights: 3 updates
    resumed = AsyncRollouts(resumed_role, PROMPTS, 1, 2, seed=0, max_staleness=2)
    resumed.load_state_dict(state)
    try:
        tail = drive(resumed, resumed_role, 3, 6)
    finally:
        resumed.close()
    assert head + tail == expected


def test_the_synchronous_source_syncs_then_samples_with_the_iterations_seed():
    role = VersionRole()
    sync = SyncRollouts(role, PROMPTS, 1, 2, seed=5)
    role.train()
    rolls, staleness = sync.get(7, PROMPTS.batch(7, 2))
    assert (rolls.completion_ids[0][0], staleness, role.syncs) == (1, 0, 1)
    assert rolls.prompt_ids[0] == [5 * 7919 + 7]
    assert sync.state_dict() == {}


def test_close_drops_the_rollouts_still_queued():
    role = VersionRole()
    started, release, seeds = threading.Event(), threading.Event(), []
    generate = role.generate

    def blocking(prompts, n, *, seed):
        seeds.append(seed)
        if seed == rollout_seed(0, 1):  # the thread is inside rollout 1 when the run stops
            started.set()
            release.wait()
        return generate(prompts, n, seed=seed)

    role.generate = blocking
    source = AsyncRollouts(role, PROMPTS, 1, 2, seed=0, max_staleness=3)
    source.get(0, PROMPTS.batch(0, 2))  # asks for rollouts 0..3
    started.wait()
    closer = threading.Thread(target=source.close)
    closer.start()
    while not source.closing:
        time.sleep(0.001)
    release.set()
    closer.join()
    assert seeds == [rollout_seed(0, 0), rollout_seed(0, 1)]  # 2 and 3 never sampled
    assert not source.thread.is_alive()
