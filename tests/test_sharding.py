"""FSDP2 (``train.sharding: fsdp``, ``engine/sharding.py``) on 2 CPU processes (gloo): SFT, DPO,
a reward model, GRPO, online DPO and PPO (policy and critic sharded) train like one process with
the batch split in 2 accumulated micro-batches, a killed sharded run (SFT, reward, PPO) resumes to
the uninterrupted one, ``final/`` and the checkpoints are plain full-weight files (the reward
model's a plain sequence classifier), and what is not sharded yet is refused naming the field.
Slow: a sharded reward ensemble evaluated by rank 0, the other online preference trainers.

One launch (``tests/fsdp_worker.py``, with the environment ``accelerate launch`` sets for
``configs/accelerate/fsdp2.yaml``) runs every sharded run; the 1-process runs are the
session's memoised ones with the fast paths off (a sharded model's log-probs go through
``model(...)``: what differs is then the sharding alone). Tolerances: the invariant tests'
(``tests/invariant_runs.py``: losses 1e-5, update 1e-2 of the weights' movement, metrics 1e-4).
Measured in ``docs/scaling.md`` ("Sharded training").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignlab.core.config import ModelSection, TrainSection
from alignlab.core.errors import ConfigError
from alignlab.engine import sharding
from alignlab.models import fast_path

from tests.invariant_runs import (
    METRIC_TOL,
    UPDATE_TOL,
    WEIGHT_TOL,
    Outcome,
    assert_equivalent,
    difference,
    loss_tolerance,
    relative_loss,
)
from tests.test_distributed import ONE_PROCESS, OPTIONS, ROOT, SRC, launch

FAMILIES = ("sft", "dpo", "reward", "grpo", "online_dpo", "ppo")
RESUMED = ("sft", "reward", "ppo")  # killed after step 3, resumed from the checkpoint of step 2
# Online DPO: 4 pairs an iteration, 2 a rank (one micro-batch) against 2 micro-batches of 2 in
# one process; PPO: 8 rows, 4 a rank, against 2 micro-batches of 4 (the critic's too).
ONLINE = {"online_dpo": {"micro": 2, "rollout_batch": 4},
          **{f: {"micro": 4, "rollout_batch": 4} for f in ("ppo", "ppo_shared", "nlpo")}}
PAIRWISE = ({"preference_model": {"micro": 8}}, {"preference_model": {"micro": 4, "accum": 2}})
OPTIONS, ONE_PROCESS = {**OPTIONS, **ONLINE, **PAIRWISE[0]}, {**ONE_PROCESS, **ONLINE, **PAIRWISE[1]}
SHARDED_MODELS = {"ppo": 2}  # the policy and the critic, each sharded
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.fixture(scope="module")
def sharded(tiny_world, world_cache, tmp_path_factory) -> dict:
    import torch

    out = tmp_path_factory.mktemp("fsdp")
    plan = [[f, f, OPTIONS[f], None] for f in FAMILIES]
    plan += [[f"{f}-resumed", f, {**OPTIONS[f], "save_every": 2}, 3] for f in RESUMED]
    done = launch(2, [str(out), json.dumps(plan)], ROOT,
                  {"ALIGNLAB_TEST_CACHE": world_cache, **FSDP_ENV}, module="tests.fsdp_worker")
    (out / "launch.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    outcomes = torch.load(out / "outcomes.pt", weights_only=False)
    result = {"checks": outcomes.pop("checks"), "log": done.stdout + done.stderr}
    for name, o in outcomes.items():
        assert o.pop("world_size") == 2
        result[name] = Outcome(**o)
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_trains_like_one_process_with_accumulation(family, sharded, family_runs):
    one = family_runs.run(family, **ONE_PROCESS[family], fast=False)
    two = sharded[family]
    assert sorted(two.metrics) == [1, 2, 3, 4]
    assert two.paths == {"plain"}  # the fast paths were off: every log-prob through model(...)
    assert_equivalent(one, two)
    for step, metrics in one.metrics.items():  # every metric logged, as in one process
        assert set(two.metrics[step]) == set(metrics)


@pytest.mark.parametrize("family", RESUMED)
def test_fsdp_run_resumes_to_the_uninterrupted_one(family, sharded):
    whole, resumed = sharded[family], sharded[f"{family}-resumed"]
    assert sorted(resumed.metrics) == [1, 2, 3, 4]
    d = difference(whole, resumed)  # optimizer moments resharded from the full state dict
    assert d.loss == d.weight == d.metric == 0.0, d


def test_final_and_checkpoints_are_plain_full_weights(sharded):
    import torch
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    run = sharded["dpo"]
    final = Path(run.output_dir) / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(final)  # a normal model, not sharded
    for key, value in model.state_dict().items():
        assert torch.equal(value, run.weights[key]), key
    ckpt = Path(sharded["sft-resumed"].output_dir) / "checkpoints" / "step-0000004"
    load_model(model, str(ckpt / "model.safetensors"), strict=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, sharded["sft-resumed"].weights[key]), key
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    moments = state["optimizer"]["state"]["model.layers.0.mlp.up_proj.weight"]
    assert moments["exp_avg"].shape == model.model.layers[0].mlp.up_proj.weight.shape  # full


def test_sharded_reward_model_final_is_a_plain_classifier(sharded):
    """The reward model's ``final/`` (written from the gathered full state dict) loads as a plain
    ``AutoModelForSequenceClassification`` with the trained body and head, and alignlab's loader
    scores with it exactly."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignlab.models.heads import load_reward_model

    run = sharded["reward"]
    final = Path(run.output_dir) / "final"
    classifier = AutoModelForSequenceClassification.from_pretrained(final)
    state = classifier.state_dict()
    assert torch.equal(state["score.weight"], run.weights["head.weight"])
    body = {k.removeprefix("backbone."): v for k, v in run.weights.items()
            if k.startswith("backbone.")}
    for key, value in body.items():
        assert torch.equal(state[f"model.{key}"], value), key
    loaded = load_reward_model(final)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, run.weights[key]), key


def test_shard_holds_half_sums_gradients_and_gathers(sharded):
    rank0, rank1 = sharded["checks"]
    for r in (rank0, rank1):
        assert 0.45 < r["local_fraction"] <= 0.55  # each rank holds about half of every weight
        # relative to the largest coordinate: the sum of both ranks' gradients (a mean: 0.5)
        assert r["grad_error"] < 1e-5
        assert r["norm_error"] < 1e-6
        assert r["forward_error"] < 1e-5  # 1 and 4 forwards inside full_weights: no hang
        # a zero-weighted padding pass adds nothing: 1 + padding and 2 micro-batches train as
        # the 3 micro-batches in one process (loss, item count and gradient)
        assert r["padding_error"] < 1e-5 and r["padding_loss_error"] < 1e-6
        assert r["items"] == 3 * 2 * 9
    assert rank0["state_error"] == 0.0 and rank1["state_keys"] == {}  # rank 0 holds it


def test_fast_paths_turn_off_with_one_line_per_process(sharded):
    log = sharded["log"]
    assert log.count("fast log-prob paths are off (train.sharding=fsdp") == 2  # one per rank
    # the helper check, every family, and the killed and the resumed runs; PPO shards two
    models = 1 + sum(SHARDED_MODELS.get(f, 1) for f in FAMILIES)
    models += 2 * sum(SHARDED_MODELS.get(f, 1) for f in RESUMED)
    assert log.count("train.sharding fsdp: 2 decoder layers and the root sharded") == models


class _Config:
    SHARDABLE = True

    def __init__(self, **train) -> None:
        self.train = TrainSection(**train)
        self.model = ModelSection()


def test_what_is_not_sharded_yet_is_refused(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    sharding.check(_Config())  # sharding none: nothing checked, fast paths untouched
    assert fast_path.fast_paths_enabled()

    class Other(_Config):
        SHARDABLE = False

    with pytest.raises(ConfigError, match=r"field 'train.sharding': 'fsdp' is not supported by "
                                          r"this trainer \(Other\)"):
        sharding.check(Other(sharding="fsdp"))
    lora = _Config(sharding="fsdp")
    lora.model = ModelSection(lora={"r": 4})
    with pytest.raises(ConfigError, match="'fsdp' with model.lora"):
        sharding.check(lora)
    from alignlab.algorithms.policy_gradient.config import OnlineRLConfig

    stale = OnlineRLConfig(train={"sharding": "fsdp"}, rl={"max_staleness": 1})
    with pytest.raises(ConfigError, match="rl.max_staleness"):
        sharding.check(stale)
    vllm = OnlineRLConfig(train={"sharding": "fsdp"}, rollout={"backend": "vllm"})
    with pytest.raises(ConfigError, match="rollout.backend builtin"):
        sharding.check(vllm)
    from alignlab.algorithms.registry import ALGORITHMS

    for name in ALGORITHMS.names():  # every built-in trainer has opted in
        assert getattr(ALGORITHMS.get(name).config_cls, "SHARDABLE", False), name
    # accelerate's FSDP2 launch asks for it without the field
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert sharding.mode(TrainSection()) == "fsdp"
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert sharding.mode(TrainSection()) == "none"  # refused by distributed.setup
    try:
        sharding.check(OnlineRLConfig(train={"sharding": "fsdp"}))  # grpo-like: runs
        assert not fast_path.fast_paths_enabled()
        for name in ("reward", "online_dpo", "xpo", "iterative_dpo", "nlpo", "egpo"):  # opted in
            sharding.check(ALGORITHMS.get(name).config_cls(train={"sharding": "fsdp"}))
    finally:
        fast_path.set_fast_paths(True)


def test_one_process_ignores_sharding():
    import torch

    model = torch.nn.Linear(2, 2)
    assert not sharding.shard(model, TrainSection(sharding="fsdp"))  # no process group
    assert not sharding.is_sharded(model) and sharding.full_state_dict(model) is None
    with sharding.full_weights(model):
        pass


@pytest.mark.slow
def test_accelerate_launch_fsdp2_config(tiny_world, world_cache, tmp_path, family_runs):
    """``accelerate launch --config_file configs/accelerate/fsdp2.yaml -m alignlab train sft``
    on CPU shards the model and trains like one process."""
    import os

    from tests.test_distributed import _sft_command

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1",
           "ALIGNLAB_DIST_TIMEOUT_MIN": "10", "OMP_NUM_THREADS": "1"}
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "-m", "alignlab"]
    done = subprocess.run([*accelerate, *_sft_command(out, world_cache)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "train.sharding fsdp: 2 decoder layers" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    one = family_runs.run("sft", micro=4, accum=2, fast=False)
    for r in rows:  # metrics.jsonl keeps 6 decimals
        assert abs(r["loss"] - one.losses[r["step"]]) <= 2e-6


SHARDED_TRAINERS = {  # name: (extra --set values, a file or metric the run must have written)
    "dpo": (["data.limit=64", "preference.heldout=8"], "heldout.json"),  # rank 0 evaluates
    "rloo": (["rollout.prompts_per_step=4", "rl.minibatch_size=6"], "reward_mean"),
    "remax": (["rollout.prompts_per_step=4"], "reward_mean"),  # a greedy baseline sampled too
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHARDED_TRAINERS))
def test_more_trainers_run_sharded(name, tiny_world, world_cache, tmp_path):
    """Trainers with parts the invariant families lack run sharded to the end: DPO's held-out
    evaluation by rank 0 alone, RLOO with minibatches that split unevenly over the ranks,
    ReMax's greedy baseline sampled through the gathered weights."""
    import os

    out = tmp_path / "run"
    sets = [f"world.cache_dir={world_cache}", "world.preset=tiny", f"train.output_dir={out}",
            "train.max_steps=3", "train.save_every=2", "train.progress=false",
            "train.tensorboard=false", "train.device=cpu", "train.batch_size=8",
            "train.log_every=1", "train.sharding=fsdp", *SHARDED_TRAINERS[name][0]]
    if name != "dpo":
        sets += ["rollout.max_new_tokens=12", "train.batch_size=4"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1",
           "ALIGNLAB_DIST_TIMEOUT_MIN": "10", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "alignlab", "train", name, "--num-processes",
                           "2", *(a for s in sets for a in ("--set", s))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "train.sharding fsdp: 2 decoder layers" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and (out / "DONE").exists()
    what = SHARDED_TRAINERS[name][1]
    assert (out / what).exists() if what.endswith(".json") else what in rows[-1]


@pytest.mark.slow
def test_nlpo_the_shared_critic_and_the_preference_model_shard_like_one_process(
        tiny_world, world_cache, tmp_path, family_runs):
    """NLPO (its masking policy refreshed from the gathered policy), PPO with a shared critic
    (the value head whole on every rank beside the sharded policy, its gradient summed, the
    clipping norm over both) and the pairwise preference model (its forward the sharded root's)
    sharded on 2 processes train like one process with accumulation; the shared critic, killed
    after iteration 3, resumes to the uninterrupted run exactly."""
    import torch

    plan = [["nlpo", "nlpo", OPTIONS["nlpo"], None],
            ["preference_model", "preference_model", OPTIONS["preference_model"], None],
            ["ppo_shared", "ppo_shared", OPTIONS["ppo_shared"], None],
            ["ppo_shared-resumed", "ppo_shared", {**OPTIONS["ppo_shared"], "save_every": 2}, 3]]
    done = launch(2, [str(tmp_path), json.dumps(plan)], ROOT,
                  {"ALIGNLAB_TEST_CACHE": world_cache, **FSDP_ENV}, module="tests.fsdp_worker")
    errors = [line for line in done.stderr.splitlines() if "Error" in line]
    assert done.returncode == 0, "\n".join(errors[:20]) or done.stderr[-4000:]
    outcomes = torch.load(tmp_path / "outcomes.pt", weights_only=False)
    two = {n: Outcome(**{k: v for k, v in o.items() if k != "world_size"})
           for n, o in outcomes.items() if n != "checks"}
    for family in ("nlpo", "ppo_shared", "preference_model"):
        one = family_runs.run(family, **ONE_PROCESS[family], fast=False)
        assert sorted(two[family].metrics) == [1, 2, 3, 4] and two[family].paths == {"plain"}
        assert_equivalent(one, two[family])
    assert two["nlpo"].metrics[4]["nlpo_mask_refreshes"] >= 1  # the refresh was compared too
    d = difference(two["ppo_shared"], two["ppo_shared-resumed"])
    assert d.loss == d.weight == d.metric == 0.0, d


@pytest.mark.slow
def test_sharded_grpo_resumes_exactly(tiny_world, world_cache, tmp_path):
    """GRPO sharded, killed after iteration 3 and resumed from iteration 2: the learner's
    AdamW moments and each rank's state come back; losses and weights equal the whole run."""
    import torch

    plan = [["grpo", "grpo", OPTIONS["grpo"], None],
            ["grpo-resumed", "grpo", {**OPTIONS["grpo"], "save_every": 2}, 3]]
    done = launch(2, [str(tmp_path), json.dumps(plan)], ROOT,
                  {"ALIGNLAB_TEST_CACHE": world_cache, **FSDP_ENV}, module="tests.fsdp_worker")
    assert done.returncode == 0, done.stderr[-4000:]
    outcomes = torch.load(tmp_path / "outcomes.pt", weights_only=False)
    whole, resumed = (Outcome(**{k: v for k, v in outcomes[n].items() if k != "world_size"})
                      for n in ("grpo", "grpo-resumed"))
    d = difference(whole, resumed)
    assert d.loss == d.weight == d.metric == 0.0, d


@pytest.mark.slow
def test_sharded_reward_ensemble_evaluates_and_saves(tiny_world, world_cache, tmp_path):
    """``alignlab train reward`` sharded with 2 members: each member is sharded in turn, rank 0
    evaluates inside the gathered weights (every 2 steps and at the end), and ``final/`` holds
    both members as plain files whose held-out metrics are the ones the run reported."""
    import os

    from alignlab.algorithms.reward_model.evaluate import evaluate_reward_model
    from alignlab.algorithms.reward_model.trainer import (
        RewardConfig,
        load_examples,
        split_examples,
    )
    from alignlab.core.config import WorldSection
    from alignlab.models.loading import load_tokenizer
    from alignlab.rewards.reward_model import RewardEnsemble

    out = tmp_path / "run"
    sets = [f"world.cache_dir={world_cache}", "world.preset=tiny", f"train.output_dir={out}",
            "train.max_steps=2", "train.progress=false", "train.tensorboard=false",
            "train.device=cpu", "train.batch_size=8", "train.sharding=fsdp", "data.limit=48",
            "reward.eval_fraction=0.25", "reward.eval_every=2", "reward.ensemble.members=2"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1",
           "ALIGNLAB_DIST_TIMEOUT_MIN": "10", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "alignlab", "train", "reward", "--num-processes",
                           "2", *(a for s in sets for a in ("--set", s))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("train.sharding fsdp: 2 decoder layers") == 2  # one per member
    rows = [json.loads(line) for line in (out / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("member"), r.get("final")) for r in rows] == [
        (2, 0, None), (2, 1, None), (2, None, 1)]
    reported = json.loads((out / "reward_eval.json").read_text())["metrics"]
    cfg = RewardConfig(world=WorldSection(preset="tiny", cache_dir=world_cache),
                       data={"limit": 48}, reward={"eval_fraction": 0.25})
    ensemble = RewardEnsemble.from_pretrained(out / "final")
    assert ensemble.size == 2
    tokenizer = load_tokenizer(str(out / "final" / "member_0"))
    examples, pad, fmt = load_examples(cfg, tokenizer)
    _, held = split_examples(examples, cfg)
    again = evaluate_reward_model(ensemble, held, fmt, pad)
    for key, value in reported.items():  # rank 0 evaluated the full (gathered) weights
        assert abs(again[key] - value) <= 1e-5 * max(1.0, abs(value)), key


@pytest.mark.slow
def test_more_online_preference_trainers_shard_like_one_process(tiny_world, world_cache,
                                                                tmp_path, family_runs):
    """Nash-MD, XPO, VPO, SPPO, DNO, INPO, SELM, P3O and iterative DPO (with TR-DPO's soft
    refresh of its reference from the gathered policy) sharded on 2 processes train like one
    process over 2 iterations, to the invariant tolerances."""
    import torch

    from tests.invariant_runs import ONLINE_PREFERENCE

    options = {**ONLINE["online_dpo"], "steps": 2}
    plan = [[name, name, options, None] for name in ONLINE_PREFERENCE]
    done = launch(2, [str(tmp_path), json.dumps(plan)], ROOT,
                  {"ALIGNLAB_TEST_CACHE": world_cache, **FSDP_ENV}, module="tests.fsdp_worker")
    errors = [line for line in done.stderr.splitlines() if "Error" in line]
    assert done.returncode == 0, "\n".join(errors[:20]) or done.stderr[-4000:]
    outcomes = torch.load(tmp_path / "outcomes.pt", weights_only=False)
    for name in ONLINE_PREFERENCE:
        two = Outcome(**{k: v for k, v in outcomes[name].items() if k != "world_size"})
        one = family_runs.run(name, **options, fast=False)
        assert sorted(two.metrics) == [1, 2], name
        d = difference(one, two)
        # the squared losses (SPPO, INPO, DNO's regression) reach O(100): relative to max(1, |l|)
        loss = relative_loss(one, two)
        print(f"{name}: relative loss {loss:.2e}, {d}")
        assert loss <= loss_tolerance(name) and d.update <= UPDATE_TOL, (name, loss, d)
        assert d.weight <= WEIGHT_TOL and d.metric <= METRIC_TOL, (name, d)
    assert outcomes["iterative_dpo"]["metrics"][2]["reference_refreshes"] == 2
