"""``train.placement: ray``: the online controller with rollout and reward/judge on Ray actors.

The Ray runs share one small Ray session (a module fixture: Ray starts in tens of seconds on
these shared cores). The equivalence checks compare a Ray run with the one-process run of the
same config and seed: the rollout workers sample whole decode chunks seeded by their first
prompt's index, with one torch thread as the trainer here, so every sampled token, every
sampler log-prob, every loss and every final weight is *identical* (tolerance 0, measured).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytest
import torch

from alignlab.algorithms.registry import ALGORITHMS
from alignlab.core.config import OnlineTrainSection, RaySection, RolloutSection, WorldSection
from alignlab.core.errors import ConfigError
from alignlab.engine.placement import RAY_MISSING
from alignlab.engine.ray_workers import RolloutWorker, apply_weights
from alignlab.engine.run import TrainingRun
from alignlab.rollout.role import RolloutRole

from tests import online_preference_helpers as pref
from tests.conftest import random_llama

# Where each online algorithm stands on Ray; a new online algorithm must join one of them.
RUNS_ON_RAY = ("grpo", "rloo", "remax", "reinforce_pp", "ppo", "online_dpo", "iterative_dpo",
               "xpo", "nash_md", "sppo", "p3o", "selm", "vpo", "inpo", "dno", "egpo")
REFUSED_ON_RAY = ("nlpo",)
POLICY_GRADIENT = ("grpo", "rloo", "remax", "reinforce_pp", "ppo", "nlpo")
# Two workers on two CPUs beside the trainer and the reward worker: half a CPU each.
RAY = RaySection(num_rollout_workers=2, num_cpus_per_worker=0.5, reward_num_cpus=0.5)


def online_algorithms() -> list[str]:
    return [n for n in ALGORITHMS.names()
            if "placement" in ALGORITHMS.get(n).config_cls.model_fields["train"].annotation
            .model_fields]


def config(name: str, world_cache: str, out: Any, placement: str, *, steps: int = 2,
           lora: bool = False, **rl: Any) -> Any:
    """4 prompts x 4 samples an iteration decoded in chunks of 2 prompts (rollout.batch_size 8),
    so each of the two workers samples one chunk; lr 1e-3, seed 3; ``rl`` adds to the ``rl``
    section of the policy-gradient family."""
    train = OnlineTrainSection(output_dir=str(out), max_steps=steps, lr=1e-3, precision="fp32",
                               device="cpu", log_every=1, save_every=None, progress=False,
                               tensorboard=False, seed=3, placement=placement, ray=RAY)
    rollout = RolloutSection(prompts="world:positive", prompts_per_step=4, n=4,
                             max_new_tokens=16, batch_size=8)
    if name in POLICY_GRADIENT:
        # Two optimizer steps an iteration and a KL term: old and reference log-probs count.
        cfg = ALGORITHMS.get(name).config_cls(
            world=WorldSection(preset="tiny", cache_dir=world_cache), train=train.model_dump(),
            rollout=rollout, rl={"kl_coef": 0.05, "minibatch_size": 8,
                                 "loss_aggregation": "token_mean", **rl})
    else:
        cfg = pref.config(name, world_cache, out, steps=steps)
        cfg = cfg.model_copy(update={"train": train, "rollout": rollout})
    if lora:
        cfg.model.lora = {"r": 4, "alpha": 8.0}
    return cfg


def train(name: str, cfg: Any) -> tuple[Any, dict[int, dict[str, Any]], dict[str, torch.Tensor]]:
    """The run, its metrics by step (unrounded) and its starting weights; one torch thread, as
    the rollout workers decode with."""
    logged: dict[int, dict[str, Any]] = {}
    start: dict[str, torch.Tensor] = {}
    real_init, real_done = TrainingRun.__init__, TrainingRun.step_done

    def init(self, cfg, model, description):
        real_init(self, cfg, model, description)
        start.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    def step_done(self, step, metrics, info, state):
        real_done(self, step, metrics, info, state)
        logged[step] = dict(metrics)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TrainingRun, "__init__", init)
            mp.setattr(TrainingRun, "step_done", step_done)
            run = ALGORITHMS.get(name).run(cfg)
    finally:
        torch.set_num_threads(threads)
    return run, logged, start


def assert_identical(local: tuple, placed: tuple) -> None:
    """Every logged value but timings, and every final weight, equal; the weights moved."""
    (run_a, logged_a, start), (run_b, logged_b, _) = local, placed
    assert logged_a.keys() == logged_b.keys()
    for step in logged_a:
        a = {k: v for k, v in logged_a[step].items() if not k.startswith("time_")}
        b = {k: v for k, v in logged_b[step].items() if not k.startswith("time_")}
        assert a == b, (step, {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)})
    wa, wb = run_a.model.state_dict(), run_b.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], start[k]) for k in wa), "training moved no weight"


# --------------------------------------------------------------------------- without Ray


def test_prompts_are_shared_in_whole_contiguous_chunks():
    from alignlab.engine.ray_placement import shard_prompts

    assert shard_prompts(8, 2, 2) == [range(0, 4), range(4, 8)]
    assert shard_prompts(7, 2, 3) == [range(0, 4), range(4, 6), range(6, 7)]  # 4 chunks
    assert shard_prompts(3, 4, 2) == [range(0, 3)]  # one chunk: one worker, the other idle
    assert shard_prompts(5, 1, 2) == [range(0, 3), range(3, 5)]


def test_a_sync_sends_the_whole_state_first_then_the_trained_parameters():
    from alignlab.engine.ray_placement import sync_payload

    model = random_llama()
    full = sync_payload(model, full=True)
    assert full.keys() == model.state_dict().keys()
    assert sync_payload(model, full=False).keys() == {n for n, _ in model.named_parameters()}
    model.model.embed_tokens.requires_grad_(False)  # frozen: never sent again
    assert "model.embed_tokens.weight" not in sync_payload(model, full=False)


def test_under_lora_a_sync_after_the_first_sends_the_adapters_alone():
    from peft import LoraConfig, get_peft_model

    from alignlab.engine.ray_placement import sync_payload

    model = get_peft_model(random_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    sent = sync_payload(model, full=False)
    assert sent and all(".lora_A." in k or ".lora_B." in k for k in sent)
    assert len(sent) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    full = sync_payload(model, full=True)  # the first sync: the frozen base weights too
    assert set(sent) < set(full) and any(k.endswith("q_proj.base_layer.weight") for k in full)


def test_applied_weights_equal_the_senders_and_unknown_names_are_refused():
    a, b = random_llama(seed=1), random_llama(seed=2)
    apply_weights(b, {k: v for k, v in a.state_dict().items()})
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(KeyError, match="lacks"):
        apply_weights(b, {"lm_head.extra": torch.zeros(1)})


class _Handle:
    """A worker in this process behind a Ray actor handle's ``method.remote(...)``."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.obj, name)
        return type("Method", (), {"remote": staticmethod(method)})


def test_sharded_sampling_in_worker_processes_equals_one_process(tiny_world, monkeypatch):
    """The rollout role's sharding (3 workers, 5 prompts in chunks of 2, so 2 + 2 + 1) with
    the workers in this process: the Rollouts equal the one-process role's, ids, finish
    reasons, texts and sampler log-probs alike; the Ray test below runs them in actors."""
    ray_placement = pytest.importorskip("alignlab.engine.ray_placement")
    from alignlab.models.loading import load_model, load_tokenizer

    model = load_model(str(tiny_world.base_dir))
    tok = load_tokenizer(str(tiny_world.base_dir))
    local = RolloutRole(model, tok, max_new_tokens=12, batch_size=8)
    monkeypatch.setattr(ray_placement, "get", lambda refs: refs)
    monkeypatch.setattr(ray_placement.ray, "put", lambda x: x)
    threads = torch.get_num_threads()  # a worker sets its process's thread count: restored
    try:
        workers = []
        for _ in range(3):
            w = RolloutWorker(threads=1)
            w.build(lambda: load_model(str(tiny_world.base_dir)), eos_token_id=local.eos,
                    pad_token_id=local.pad, batch_size=8, device="cpu")
            workers.append(_Handle(w))
        placed = RolloutRole(model, tok, max_new_tokens=12, batch_size=8,
                             backend=ray_placement.RayBackend(workers, batch_size=8))
        with torch.no_grad():  # the trainer's weights are no longer the saved ones
            model.model.norm.weight.mul_(1.5)
        placed.sync_weights()
        prompts = tiny_world.task("positive").train_prompts[:5]
        a = local.generate(prompts, 4, seed=11)
        b = placed.generate(prompts, 4, seed=11)
    finally:
        torch.set_num_threads(threads)
    assert a == b
    assert len(set(a.completions)) > 5  # sampled, not one repeated text
    assert sorted(w.obj.loads for w in workers) == [1, 1, 1]
    assert placed.backend.last_sync == sorted(model.state_dict())  # the first: the whole state


def test_placement_ray_without_ray_installed_is_a_config_error(world_cache, tmp_path,
                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError) as err:
        train("grpo", config("grpo", world_cache, tmp_path, "ray"))
    assert str(err.value) == RAY_MISSING
    assert "field 'train.placement'" in RAY_MISSING and "alignlab[ray]" in RAY_MISSING


def test_placement_ray_under_several_processes_is_a_config_error(monkeypatch):
    from alignlab.engine.placement import open_placement

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun/accelerate set in each process
    with pytest.raises(ConfigError, match="'train.placement': 'ray' runs one trainer process"):
        open_placement(OnlineTrainSection(placement="ray"), "grpo")


def test_the_vllm_backend_on_ray_is_refused_naming_the_field(world_cache, tmp_path):
    cfg = config("grpo", world_cache, tmp_path, "ray")
    cfg.rollout.backend = "vllm"
    with pytest.raises(ConfigError, match="'train.placement': rollout.backend 'vllm' cannot run "
                                          "on Ray: the rollout workers sample with alignlab's "
                                          "built-in engine; set it to 'local'"):
        train("grpo", cfg)


def test_every_online_algorithm_runs_on_ray_or_is_refused_naming_the_field(
        world_cache, tmp_path, monkeypatch):
    """Without Ray installed, an algorithm that runs on Ray stops where Ray is imported (the
    missing-Ray error); a refused one stops before, with its reason."""
    names = online_algorithms()
    assert sorted(names) == sorted(RUNS_ON_RAY + REFUSED_ON_RAY), names
    monkeypatch.setitem(sys.modules, "ray", None)
    for name in names:
        with pytest.raises(ConfigError) as err:
            train(name, config(name, world_cache, tmp_path / name, "ray"))
        message = str(err.value)
        assert message.startswith("field 'train.placement': "), (name, message)
        if name in REFUSED_ON_RAY:
            assert f"{name} cannot run on Ray" in message and "set it to 'local'" in message
        else:
            assert message == RAY_MISSING, (name, message)


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_session():
    """One Ray for the module: 2 CPUs, no dashboard; placements use it and leave it running."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
                 logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def test_grpo_on_two_ray_rollout_actors_equals_one_process_and_syncs_weights(
        ray_session, world_cache, tmp_path, monkeypatch):
    from alignlab.engine.ray_placement import RayBackend, RemoteRewardRole

    local = train("grpo", config("grpo", world_cache, tmp_path / "local", "local", steps=3))
    syncs: list[tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor], list[str]]] = []
    scored: list[int] = []
    real_sync, real_score = RayBackend.sync_weights, RemoteRewardRole.score

    def sync_weights(self, policy):
        real_sync(self, policy)
        trainer = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        syncs.append((self.worker_weights(), trainer, self.last_sync))

    def score(self, prompts, completions, *args):
        scored.append(len(completions))
        return real_score(self, prompts, completions, *args)

    monkeypatch.setattr(RayBackend, "sync_weights", sync_weights)
    monkeypatch.setattr(RemoteRewardRole, "score", score)
    placed = train("grpo", config("grpo", world_cache, tmp_path / "ray", "ray", steps=3))
    assert_identical(local, placed)
    assert scored == [16, 16, 16]  # every iteration scored on the reward worker
    assert len(syncs) == 3  # before every rollout: the start, then after each update
    for i, (workers, trainer, sent) in enumerate(syncs):
        assert len(workers) == 2
        for w in workers:
            assert w.keys() == trainer.keys()
            assert all(torch.equal(w[k], trainer[k]) for k in trainer), i
        params = sorted(n for n, _ in placed[0].model.named_parameters())
        assert sent == (sorted(trainer) if i == 0 else params)
    moved = [k for k in syncs[0][1] if not torch.equal(syncs[0][1][k], syncs[1][1][k])]
    assert moved, "the second sync sent the same weights as the first"
    _assert_actors_released(ray_session)


def test_online_dpo_with_its_judge_on_the_reward_worker_equals_one_process(
        ray_session, world_cache, tmp_path):
    local = train("online_dpo", config("online_dpo", world_cache, tmp_path / "local", "local"))
    placed = train("online_dpo", config("online_dpo", world_cache, tmp_path / "ray", "ray"))
    assert_identical(local, placed)
    last = placed[1][2]
    assert last["labels_total"] > 0 and "labels_used" in last  # the budget, kept here
    assert "win_rate_gold" in last and "kl_ref" in last


def test_an_alignlab_error_on_a_worker_is_raised_here_as_itself(ray_session):
    from alignlab.engine.ray_placement import get

    @ray_session.remote(num_cpus=0.5)
    def bad_reward_name():
        raise ConfigError("rl.reward: unknown reward 'nope'")

    with pytest.raises(ConfigError, match="unknown reward 'nope'") as err:
        get(bad_reward_name.remote())
    assert type(err.value) is ConfigError  # not a RayTaskError: the CLI prints the message


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RUNS_ON_RAY if n not in ("grpo", "online_dpo")])
def test_every_algorithm_that_runs_on_ray_equals_one_process(ray_session, world_cache,
                                                              tmp_path, name):
    assert_identical(train(name, config(name, world_cache, tmp_path / "local", "local")),
                     train(name, config(name, world_cache, tmp_path / "ray", "ray")))


@pytest.mark.slow
def test_asynchronous_grpo_on_ray_equals_one_process(ray_session, world_cache, tmp_path):
    """rl.max_staleness 1: the rollout thread syncs the workers from its weights and samples
    ahead on them; the run equals the one-process asynchronous run (its own-copy sampler)."""
    local = train("grpo", config("grpo", world_cache, tmp_path / "local", "local", steps=3,
                                 max_staleness=1))
    assert_identical(local, train("grpo", config("grpo", world_cache, tmp_path / "ray", "ray",
                                                 steps=3, max_staleness=1)))
    assert local[1][3]["staleness"] == 1


@pytest.mark.slow
def test_lora_grpo_on_ray_syncs_the_adapters_alone_and_equals_one_process(
        ray_session, world_cache, tmp_path, monkeypatch):
    from alignlab.engine.ray_placement import RayBackend

    sent: list[list[str]] = []
    real_sync = RayBackend.sync_weights

    def sync_weights(self, policy):
        real_sync(self, policy)
        sent.append(self.last_sync)

    local = train("grpo", config("grpo", world_cache, tmp_path / "local", "local", lora=True))
    monkeypatch.setattr(RayBackend, "sync_weights", sync_weights)
    placed = train("grpo", config("grpo", world_cache, tmp_path / "ray", "ray", lora=True))
    assert_identical(local, placed)
    assert len(sent) == 2 and len(sent[0]) > len(sent[1]) > 0
    assert all("lora_A" in k or "lora_B" in k for k in sent[1])


def _assert_actors_released(ray: Any, timeout_s: float = 60.0) -> None:
    """The run's actors were stopped: every CPU of the session is free again (soon)."""
    import time

    deadline = time.time() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, ray.available_resources()
        time.sleep(0.5)

