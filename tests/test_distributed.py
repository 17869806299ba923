"""Data parallel on 2 CPU processes (gloo): the 2-process run of SFT, DPO, the reward model and
GRPO trains like the 1-process run with the batch split in 2 accumulated micro-batches, a
killed 2-process run resumes to the uninterrupted one, and a process count the batch cannot be
split over is refused before anything starts (``engine/distributed.py``, ``docs/scaling.md``).

One launch of torch's elastic launcher runs every 2-process run (``tests/ddp_worker.py``: the
invariant harness of ``tests/invariant_runs.py`` in each rank); the 1-process runs are the
session's memoised ones. Tolerances: the invariant tests' (``invariant_runs.py``). Measured
(4 steps, lr 1e-3): SFT, DPO and the reward model 0 (the same micro-batches, summed in the same
order); GRPO losses 1e-7, update 1e-5 of the weights' movement, invariant metrics 3e-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import alignlab
from alignlab.core.config import DataSection, RolloutSection, TrainSection
from alignlab.core.errors import ConfigError
from alignlab.engine import distributed
from alignlab.engine.run import check_processes

from tests.invariant_runs import FAMILIES, Outcome, assert_equivalent, difference

SRC = Path(alignlab.__file__).parents[1]
ROOT = SRC.parent
# What each family's 2-process run takes; the 1-process run is the same with micro=4, accum=2.
# GRPO: rollout.batch_size 8 = one rank's rows, so the 1-process run samples each rank's share
# with that rank's generator (rollout/engine.py: chunk seeds) and both draw the same completions.
OPTIONS = {"sft": {"micro": 8}, "dpo": {"micro": 8}, "reward": {"micro": 8},
           "grpo": {"micro": 4, "accum": 2, "rollout_batch": 8}}
ONE_PROCESS = {"sft": {"micro": 4, "accum": 2}, "dpo": {"micro": 4, "accum": 2},
               "reward": {"micro": 4, "accum": 2},
               "grpo": {"micro": 4, "accum": 2, "rollout_batch": 8}}
RESUMED = ("sft", "grpo")  # killed after step 3, resumed from the checkpoint of step 2


def launch(n: int, args: list[str], cwd: Path, env: dict[str, str] | None = None,
           module: str = "tests.ddp_worker") -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node n -m module *args``."""
    path = os.pathsep.join(filter(None, [str(SRC), str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "ALIGNLAB_DIST_TIMEOUT_MIN": "10",
           "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={n}", "-m", module, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def two_processes(tiny_world, world_cache, tmp_path_factory) -> dict:
    import torch

    out = tmp_path_factory.mktemp("ddp")
    plan = [[f, f, OPTIONS[f], None] for f in FAMILIES]
    plan += [[f"{f}-resumed", f, {**OPTIONS[f], "save_every": 2}, 3] for f in RESUMED]
    done = launch(2, [str(out), json.dumps(plan)], ROOT, {"ALIGNLAB_TEST_CACHE": world_cache})
    (out / "launch.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    outcomes = torch.load(out / "outcomes.pt", weights_only=False)
    result = {"collectives": outcomes.pop("collectives")}
    for name, o in outcomes.items():
        assert o.pop("world_size") == 2
        result[name] = Outcome(**o)
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_train_like_one_with_accumulation(family, two_processes, family_runs):
    one = family_runs.run(family, **ONE_PROCESS[family])
    two = two_processes[family]
    assert sorted(two.metrics) == [1, 2, 3, 4]
    d = assert_equivalent(one, two)
    if family != "grpo":  # the same micro-batches, the same sums: identical
        assert d.loss == d.weight == 0.0, d
    # every logged metric of the run is the one-process value (counts, rates, times aside)
    for step, metrics in one.metrics.items():
        assert set(two.metrics[step]) == set(metrics)


@pytest.mark.parametrize("family", RESUMED)
def test_two_process_run_resumes_to_the_uninterrupted_one(family, two_processes):
    whole, resumed = two_processes[family], two_processes[f"{family}-resumed"]
    assert sorted(resumed.metrics) == [1, 2, 3, 4]
    d = difference(whole, resumed)
    assert d.loss == d.weight == d.metric == 0.0, d


def test_collectives_on_two_ranks(two_processes):
    import torch

    rank0, rank1 = two_processes["collectives"]
    for r in (rank0, rank1):
        assert r["a"] == [3.0, 3.0]  # 1 + 2
        assert r["b"] == [1.0, 1.0]  # only rank 1 had a gradient: zeros on rank 0
        assert r["c"] is None  # no rank had one: AdamW must skip it as in one process
        assert r["global_sum"] == [1.0, 2.0] and r["gather"] == [0, 1] and r["any_rank"]
        assert r["shape"] == (3, 3)  # rows of both ranks, padded to the wider
    mean = (0 + 1 + 2 * (10 + 11 + 12)) / 8
    assert rank0["centred"] == [[0 - mean, 1 - mean]]
    assert rank1["centred"] == [[10 - mean, 11 - mean, 12 - mean]] * 2
    assert rank0["group"] == [0] and rank1["group"] == [1, 1]  # no id shared across ranks
    assert (rank0["share"], rank1["share"]) == (slice(0, 4), slice(4, 8))
    # a rank without rows takes part in whole_batch; no rows anywhere: fn is not called
    assert rank0["twice"] == [[3.0, 3.0, 3.0]] * 2 and rank1["twice"] == []
    assert rank0["rows_seen"] == rank1["rows_seen"] == (2, 3)
    assert rank0["nothing"] == rank1["nothing"] == ({}, None)
    # objective state merged after a step: group-robust α as one process after both ranks'
    # updates (they commute), BCO's δ the running mean over both ranks' rewards
    from alignlab.algorithms.preference.inputs import GroupWeights

    one = GroupWeights(["a", "b"], 0.5, [0.5, 0.5])
    for r in (0, 1):
        one.update(torch.tensor([1.0 + r, 0.0]), torch.tensor([0, 1]))
    for r in (rank0, rank1):
        assert r["group_weights"] == pytest.approx(one.weights.tolist(), abs=1e-12)
        assert r["shift"] == (pytest.approx((1 + 3 + 2 + 4) / 4), 4)
    assert one.weights[0] > 0.5  # the worse-off group gained weight: the check is not vacuous


class _Offline:
    def __init__(self, batch_size: int) -> None:
        self.train = TrainSection(batch_size=batch_size)
        self.data = DataSection()


class _Online(_Offline):
    def __init__(self, prompts: int) -> None:
        super().__init__(batch_size=7)
        self.rollout = RolloutSection(prompts_per_step=prompts)


def test_a_batch_the_processes_cannot_share_is_refused():
    check_processes(_Offline(8), 4)
    check_processes(_Online(6), 3)  # online: the prompts are split, not train.batch_size
    with pytest.raises(ConfigError, match=r"field 'train.batch_size': 8 examples per "
                                          r"micro-batch cannot be split evenly over 16 processes"
                                          r".*16 processes need at least 16"):
        check_processes(_Offline(8), 16)
    with pytest.raises(ConfigError, match=r"train.batch_size.*use a multiple of 3"):
        check_processes(_Offline(8), 3)
    with pytest.raises(ConfigError, match=r"field 'rollout.prompts_per_step': 4 prompts per step"
                                          r" cannot be split evenly over 3"):
        check_processes(_Online(4), 3)


def test_cli_refuses_before_launching(tmp_path):
    from alignlab.cli.main import app

    result = CliRunner().invoke(app, ["train", "sft", "--num-processes", "3", "--set",
                                      f"train.output_dir={tmp_path / 'run'}", "--set",
                                      "train.batch_size=8"])
    assert isinstance(result.exception, ConfigError), result.output
    assert "train.batch_size" in str(result.exception)
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_share_of_the_prompts_samples_what_the_whole_batch_samples():
    """Each chunk of ``batch_size`` rows has its own generator, seeded by its first prompt's
    index: a rank sampling prompts 2-3 (``first_prompt=2``) draws what one process draws for
    them in the whole batch."""
    from alignlab.rollout.engine import SamplingParams, chunk_seed, rollout

    from tests.conftest import random_llama

    model = random_llama()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]
    def sample(ids, first=0):
        params = SamplingParams(max_new_tokens=6, n=2, seed=5, first_prompt=first)
        return rollout(model, ids, params, eos_token_id=None, pad_token_id=0, batch_size=4,
                       warn_length=False)  # 2 prompts per chunk

    whole = sample(prompts)
    assert sample(prompts[:2]).completion_ids == whole.completion_ids[:4]
    assert sample(prompts[2:], first=2).completion_ids == whole.completion_ids[4:]
    assert sample(prompts[2:]).completion_ids != whole.completion_ids[4:]  # the seed differs
    assert chunk_seed(5, 0) == 5 and chunk_seed(5, 2) not in (5, chunk_seed(5, 4), chunk_seed(6, 2))


def test_single_process_helpers_are_the_identity():
    import torch

    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.global_sum([1, 2.5]) == [1.0, 2.5] and distributed.gather("x") == ["x"]
    assert distributed.share(8, "examples", "train.batch_size") == slice(0, 8)
    p = torch.nn.Parameter(torch.ones(2))
    distributed.reduce_gradients([p])
    assert p.grad is None
    rows = {"x": torch.ones(2, 3)}
    assert distributed.whole_batch(lambda r: ({"y": r["x"] * 2}, 1), rows)[0]["y"].sum() == 12
    with distributed.main_first():
        pass  # no barrier to wait on


def _sft_command(out: Path, world_cache: str) -> list[str]:
    """``train sft`` with the invariant SFT run's settings (``invariant_runs.py``)."""
    sets = {"world.preset": "tiny", "world.cache_dir": world_cache, "train.output_dir": out,
            "train.max_steps": 4, "train.lr": 1e-3, "train.precision": "fp32",
            "train.device": "cpu", "train.log_every": 1, "train.save_every": 2,
            "train.progress": "false", "train.tensorboard": "false", "train.seed": 3,
            "train.warmup_steps": 1, "train.lr_scheduler": "cosine", "train.batch_size": 8,
            "data.source": "world:positive", "data.limit": 32, "data.max_length": 64}
    return ["train", "sft", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]


def _check_cli_run(done: subprocess.CompletedProcess, out: Path, family_runs,
                   weight_tol: float = 1e-7) -> None:
    from safetensors.torch import load_file

    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("alignlab train sft") == 1  # rank 1 prints nothing
    assert done.stdout.count("done: 4 steps") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # written once, by rank 0
    assert (out / "DONE").exists() and (out / "checkpoints" / "latest").read_text().strip() \
        == "step-0000004"
    one = family_runs.run("sft", micro=4, accum=2)
    for r in rows:  # metrics.jsonl keeps 6 decimals
        assert abs(r["loss"] - one.losses[r["step"]]) <= 1e-6
    final = load_file(out / "final" / "model.safetensors")
    for key, value in final.items():
        assert (value - one.weights[key]).abs().max() <= weight_tol, key


def test_alignlab_train_num_processes(tiny_world, world_cache, tmp_path, family_runs):
    """``alignlab train sft --num-processes 2``: torch's elastic launcher starts 2 processes of
    the same command; the run equals the 1-process run with 2 accumulated micro-batches."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "ALIGNLAB_DIST_TIMEOUT_MIN": "10"}
    done = subprocess.run([sys.executable, "-m", "alignlab", *_sft_command(out, world_cache),
                           "--num-processes", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1800)
    _check_cli_run(done, out, family_runs)


@pytest.mark.slow
def test_accelerate_launch(tiny_world, world_cache, tmp_path, family_runs):
    """``accelerate launch --multi_gpu --num_processes 2 -m alignlab train ...`` on CPU: accelerate
    starts torchrun's processes, alignlab joins their group from the environment."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "ALIGNLAB_DIST_TIMEOUT_MIN": "10"}
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", "0", "-m", "alignlab"]
    done = subprocess.run([*accelerate, *_sft_command(out, world_cache)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    _check_cli_run(done, out, family_runs)


@pytest.mark.parametrize("var,match", [
    ("ACCELERATE_USE_FSDP", "asks for FSDP version 1.*fsdp_version: 2"),
    ("ACCELERATE_USE_MEGATRON_LM", "asks for Megatron-LM.*configs/accelerate/ddp.yaml")])
def test_sharded_accelerate_configs_alignlab_cannot_run_are_refused(var, match, monkeypatch):
    """An accelerate config asking for sharding alignlab does not run would otherwise train
    replicated, silently (FSDP2 runs: tests/test_sharding.py; DeepSpeed ZeRO-1/2 runs and
    stage 3 is refused: tests/test_zero.py)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    monkeypatch.setenv(var, "true")
    with pytest.raises(ConfigError, match=match):
        distributed.setup("cpu")
    assert not distributed.active()


TRAINERS = {  # name: (extra --set values, what to check in the last metrics row)
    "ppo": (["rl.minibatch_size=16"], "critic_loss"),
    "online_dpo": (["online_dpo.judge.max_labels=20"], "labels_total"),
    # a loss with state; named in full: `train bco --set preference.x=..` resets the alias's loss
    "preference": (["data.limit=64", "preference.loss=bco", "preference.heldout=8"],
                   "reward_shift"),
    "reward": (["data.limit=64", "reward.ensemble.members=2"], "accuracy"),
    "sft": (["data.limit=64", "model.lora.r=4"], "nll_per_token"),  # adapters only trained
    "grpo": (["rl.max_staleness=1"], "staleness"),  # each rank's rollout thread
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRAINERS))
def test_more_trainers_run_on_two_processes(name, tiny_world, world_cache, tmp_path):
    """Trainers with parts the invariant families lack (a critic learner, a judge's budget,
    a loss with state, an ensemble evaluated by rank 0, LoRA adapters, rollouts sampled ahead
    by a thread) run on 2 processes to the end."""
    out = tmp_path / "run"
    sets = [f"world.cache_dir={world_cache}", "world.preset=tiny", f"train.output_dir={out}",
            "train.max_steps=3", "train.save_every=2", "train.progress=false",
            "train.tensorboard=false", "train.device=cpu", "train.batch_size=8",
            "train.log_every=1",
            "rollout.max_new_tokens=12", *TRAINERS[name][0]]
    if name in ("preference", "reward", "sft"):
        sets.remove("rollout.max_new_tokens=12")
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "ALIGNLAB_DIST_TIMEOUT_MIN": "10"}
    done = subprocess.run([sys.executable, "-m", "alignlab", "train", name, "--num-processes",
                           "2", *(a for s in sets for a in ("--set", s))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = out / "member_1" / "metrics.jsonl" if name == "reward" else out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and (out / "DONE").exists()
    key = TRAINERS[name][1]
    if name == "online_dpo":
        assert rows[-1][key] == 20  # 10 labels a rank: the budget is split, not doubled
    elif name == "reward":
        assert key in json.loads((out / "reward_eval.json").read_text())["metrics"]
    elif name == "sft":  # the adapters saved beside the merged model
        assert key in rows[-1] and (out / "final" / "adapter").is_dir()
    elif name == "preference":  # rank 0 evaluated the held-out rows
        assert key in rows[-1] and "loss" in json.loads((out / "heldout.json").read_text())
    else:
        assert key in rows[-1]


def rank_one_constant(prompts, completions, **_):
    """A reward that is the same for every completion on rank 1: dynamic sampling drops all of
    that rank's groups, while rank 0's rewards (the length) vary."""
    if os.environ.get("RANK") == "1":
        return [0.0] * len(completions)
    return [float(len(c)) for c in completions]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_a_rank_whose_groups_are_all_dropped_still_takes_part(sharding, tiny_world, world_cache,
                                                              tmp_path):
    """GRPO with dynamic sampling on 2 processes where rank 1 drops every group: it has no rows
    but joins the advantages' gather and the learner's steps; rank 0's groups train. Under
    FSDP2 rank 1 runs zero-weighted passes on a row rank 0 lends it (its collectives)."""
    out = tmp_path / "run"
    sets = [f"train.sharding={sharding}",
            f"world.cache_dir={world_cache}", "world.preset=tiny", f"train.output_dir={out}",
            "train.max_steps=2", "train.progress=false", "train.tensorboard=false",
            "train.device=cpu", "rollout.max_new_tokens=8", "rollout.prompts_per_step=4",
            "rl.reward=tests.test_distributed:rank_one_constant", "rl.dynamic_sampling=true",
            "rl.kl_coef=0.05", "rl.minibatch_size=4"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1",
           "ALIGNLAB_DIST_TIMEOUT_MIN": "10"}
    done = subprocess.run([sys.executable, "-m", "alignlab", "train", "grpo", "--num-processes",
                           "2", *(a for s in sets for a in ("--set", s))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["dropped_groups"] >= 2  # rank 1's two groups (and any of rank 0's ties)
        assert r["optimizer_steps"] >= 1 and "update_skipped" not in r
