"""DeepSpeed ZeRO stages 1 and 2 (``train.sharding: zero1|zero2``, ``engine/zero.py``) on 2 CPU
processes (gloo), with the environment ``accelerate launch`` sets for
``configs/accelerate/zero2.yaml``: SFT, DPO, a reward model, GRPO, online DPO, PPO (its
critic a second engine), PPO with a shared critic (the value head partitioned with the policy),
NLPO (its masking policy refreshed from the policy) and EGPO (its extrapolation step undone from
each rank's own partition) train like one process with the batch split in 2 accumulated
micro-batches, fast paths on; killed runs (SFT, both PPOs, EGPO) resume to the uninterrupted
ones from the partitions in the checkpoint; each rank holds half of the AdamW state. The config merge and
the refusals are tested without DeepSpeed; the runs need it (``pip install
'alignlab[deepspeed]'``) and skip without it.

Tolerances: the invariant tests' (``tests/invariant_runs.py``). Measured in
``docs/scaling.md`` ("DeepSpeed ZeRO-1/2").
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from alignlab.core.config import TrainSection
from alignlab.core.errors import ConfigError
from alignlab.engine import sharding, zero

from tests.invariant_runs import Outcome, assert_equivalent, difference
from tests.test_distributed import ONE_PROCESS, OPTIONS, ROOT, launch
from tests.test_sharding import ONLINE, _Config

FAMILIES = ("sft", "dpo", "reward", "grpo", "online_dpo", "ppo", "ppo_shared", "nlpo", "egpo",
            "preference_model")
RESUMED = ("sft", "ppo", "ppo_shared", "egpo")
ONLINE = {**ONLINE, "egpo": ONLINE["online_dpo"]}  # EGPO: 4 judged pairs, one extrapolation step
PAIRWISE = ({"preference_model": {"micro": 8}}, {"preference_model": {"micro": 4, "accum": 2}})
OPTIONS, ONE_PROCESS = {**OPTIONS, **ONLINE, **PAIRWISE[0]}, {**ONE_PROCESS, **ONLINE, **PAIRWISE[1]}
ZERO2_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
             "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "ACCELERATE_GRADIENT_CLIPPING": "1.0",
             "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none"}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install deepspeed)")
ACCELERATE_VARS = [*ZERO2_ENV, "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_USE_FSDP"]


@pytest.fixture
def clean_env(monkeypatch):
    for var in ACCELERATE_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_the_deepspeed_config_comes_from_train(clean_env):
    cfg = TrainSection(sharding="zero2", batch_size=8, grad_accum=3, max_grad_norm=0.5)
    ds = zero.ds_config(cfg, 2)
    assert ds["zero_optimization"] == {"stage": 2}
    # the loop accumulates its 3 micro-batches and calls step() once: DeepSpeed sees one
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 0.5
    assert ds["managed_gradient_accumulation"] is False
    assert zero.ds_config(TrainSection(sharding="zero1", max_grad_norm=None), 2)[
        "gradient_clipping"] == 0.0
    assert zero.stage(cfg) == 2 and zero.stage(TrainSection()) == 0
    assert sharding.sharded_by(cfg) == "zero2" and sharding.sharded_by(TrainSection()) is None


def test_accelerate_launch_environment_and_config_file(clean_env, tmp_path):
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    clean_env.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")  # accelerate's default
    clean_env.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")
    assert zero.launch_config() == {"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}
    assert zero.stage(TrainSection()) == 1 and sharding.sharded_by(TrainSection()) == "zero1"
    with pytest.raises(ConfigError, match="'gradient_clipping': 1.0, but alignlab's "
                                          "train.max_grad_norm gives 0.3"):
        zero.ds_config(TrainSection(max_grad_norm=0.3), 2)
    clean_env.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(ConfigError, match="'gradient_accumulation_steps': 4.*train.grad_accum"):
        zero.ds_config(TrainSection(), 2)
    assert zero.ds_config(TrainSection(grad_accum=4), 2)["gradient_accumulation_steps"] == 1
    with pytest.raises(ConfigError, match="'fsdp' while accelerate launch asks for DeepSpeed"):
        zero.stage(TrainSection(sharding="fsdp"))
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False},
                                "train_micro_batch_size_per_gpu": "auto",
                                "train_batch_size": 16}))
    clean_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    ds = zero.ds_config(TrainSection(batch_size=16), 2)  # its own keys kept, "auto" filled
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert ds["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(ConfigError, match="'train_batch_size': 16.*train.batch_size × "
                                          "train.grad_accum gives 8"):
        zero.ds_config(TrainSection(batch_size=8), 2)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2},
                                "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="section 'optimizer'.*remove the section"):
        zero.ds_config(TrainSection(), 2)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="section 'bf16'.*train.precision"):
        zero.ds_config(TrainSection(), 2)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=f"deepspeed_config_file {path}: cannot be read"):
        zero.launch_config()


def test_what_zero_does_not_run_is_refused(clean_env):
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "4")
    with pytest.raises(ConfigError, match="zero_optimization.stage: 4; alignlab runs DeepSpeed "
                                          "ZeRO stages 1, 2 and 3"):
        zero.check(TrainSection(), 2)
    clean_env.delenv("ACCELERATE_USE_DEEPSPEED")
    clean_env.setitem(__import__("sys").modules, "deepspeed", None)  # not installed
    with pytest.raises(ConfigError, match=r"ZeRO stage 2 needs DeepSpeed, which is not "
                                          r"installed: pip install 'alignlab\[deepspeed\]'"):
        zero.check(TrainSection(sharding="zero2"), 2)


def test_trainers_not_sharded_yet_are_refused_under_zero(clean_env):
    clean_env.setattr(zero, "check", lambda cfg, processes: zero.stage(cfg))  # no DeepSpeed needed
    from alignlab.algorithms.registry import ALGORITHMS

    class Other(_Config):
        SHARDABLE = False

    with pytest.raises(ConfigError, match=r"'zero2' is not supported by this trainer \(Other\)"):
        sharding.check(Other(sharding="zero2"))
    with pytest.raises(ConfigError, match="'zero1' with model.lora"):
        lora = _Config(sharding="zero1")
        lora.model = lora.model.model_copy(update={"lora": {"r": 4}})
        sharding.check(lora)
    from alignlab.models import fast_path

    sharding.check(ALGORITHMS.get("dpo").config_cls(train={"sharding": "zero2"}))
    assert fast_path.fast_paths_enabled()  # ZeRO-1/2 keep the whole weights: fast paths stay


@pytest.fixture(scope="module")
def zero_runs(tiny_world, world_cache, tmp_path_factory) -> dict:
    import torch

    result = {}
    for stage, plan in ((2, [[f, f, OPTIONS[f], None] for f in FAMILIES]
                         + [[f"{f}-resumed", f, {**OPTIONS[f], "save_every": 2}, 3]
                            for f in RESUMED]),
                        (1, [["sft", "sft", OPTIONS["sft"], None]]),
                        (3, [[f, f, {**OPTIONS[f], "fast": False}, None] for f in FAMILIES]
                         + [[f"{f}-resumed", f, {**OPTIONS[f], "fast": False, "save_every": 2}, 3]
                            for f in RESUMED])):
        out = tmp_path_factory.mktemp(f"zero{stage}")
        env = {**ZERO2_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
               "ALIGNLAB_TEST_CACHE": world_cache}
        done = launch(2, [str(out), json.dumps(plan)], ROOT, env, module="tests.zero_worker")
        (out / "launch.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr[-4000:]
        outcomes = torch.load(out / "outcomes.pt", weights_only=False)
        result[f"checks{stage}"] = outcomes.pop("checks")
        result[f"log{stage}"] = done.stdout + done.stderr
        for name, o in outcomes.items():
            assert o.pop("world_size") == 2
            result[name if stage == 2 else f"{name}-zero{stage}"] = Outcome(**o)
    return result


@needs_deepspeed
@pytest.mark.parametrize("family", FAMILIES)
def test_zero2_trains_like_one_process_with_accumulation(family, zero_runs, family_runs):
    one = family_runs.run(family, **ONE_PROCESS[family])
    two = zero_runs[family]
    assert sorted(two.metrics) == [1, 2, 3, 4]
    assert two.paths == one.paths  # the fast paths ran as in one process
    assert_equivalent(one, two)
    for step, metrics in one.metrics.items():
        assert set(two.metrics[step]) == set(metrics)


@needs_deepspeed
@pytest.mark.parametrize("family", FAMILIES)
def test_zero3_trains_like_one_process_with_accumulation(family, zero_runs, family_runs):
    """Stage 3 partitions the weights too: log-probs through model(...) (the fast paths off, as
    the one-process run here), sampling and scoring inside the gathered weights."""
    one = family_runs.run(family, **ONE_PROCESS[family], fast=False)
    three = zero_runs[f"{family}-zero3"]
    assert sorted(three.metrics) == [1, 2, 3, 4] and three.paths == {"plain"}
    assert_equivalent(one, three)
    for step, metrics in one.metrics.items():
        assert set(three.metrics[step]) == set(metrics)


@needs_deepspeed
@pytest.mark.parametrize("family", RESUMED)
def test_zero3_run_resumes_to_the_uninterrupted_one(family, zero_runs):
    whole, resumed = zero_runs[f"{family}-zero3"], zero_runs[f"{family}-resumed-zero3"]
    d = difference(whole, resumed)  # the partitions of weights and AdamW state restored
    assert d.loss == d.weight == d.metric == 0.0, d


@needs_deepspeed
def test_zero1_trains_like_one_process(zero_runs, family_runs):
    assert_equivalent(family_runs.run("sft", **ONE_PROCESS["sft"]), zero_runs["sft-zero1"])


@needs_deepspeed
@pytest.mark.parametrize("family", RESUMED)
def test_zero2_run_resumes_to_the_uninterrupted_one(family, zero_runs):
    whole, resumed = zero_runs[family], zero_runs[f"{family}-resumed"]
    assert sorted(resumed.metrics) == [1, 2, 3, 4]
    d = difference(whole, resumed)  # each rank's partition of the AdamW state restored
    assert d.loss == d.weight == d.metric == 0.0, d


@needs_deepspeed
def test_each_rank_holds_half_of_the_optimizer_state(zero_runs):
    checks = zero_runs["checks3"]  # stage 3: half of the weights too
    assert [c["stage"] for c in checks] == [3, 3]
    assert all(c["weights"] == pytest.approx(0.5, abs=1e-3) for c in checks)
    assert "DeepSpeed ZeRO stage 3 over 2 processes (weights, gradients" in zero_runs["log3"]
    # stage 3 turns the fast paths off with one logged line per process; 1 and 2 keep them
    assert zero_runs["log3"].count("fast log-prob paths are off (train.sharding=zero3") == 2
    assert "fast log-prob paths are off" not in zero_runs["log2"]
    for stage in (1, 2, 3):
        checks = zero_runs[f"checks{stage}"]
        assert [c["stage"] for c in checks] == [stage, stage]
        assert sum(c["fraction"] for c in checks) == pytest.approx(1.0, abs=1e-3)
        assert all(c["fraction"] == pytest.approx(0.5, abs=1e-3) for c in checks)
    assert "train.sharding zero2: DeepSpeed ZeRO stage 2 over 2 processes" in zero_runs["log2"]


@needs_deepspeed
def test_checkpoint_holds_both_partitions_and_loads_safely(zero_runs):
    import torch

    ckpt = Path(zero_runs["sft-resumed"].output_dir) / "checkpoints" / "step-0000004"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # nothing unpickled
    opt = state["optimizer"]
    assert opt["zero_stage"] == 2 and len(opt["partitions"]) == 2
    sizes = [sum(t.numel() for t in p["single_partition_of_fp32_groups"])
             for p in opt["partitions"]]
    from safetensors.torch import load_file

    weights = load_file(ckpt / "model.safetensors")  # the tied output embedding once
    assert "lm_head.weight" in weights and "model.embed_tokens.weight" not in weights
    total = sum(v.numel() for v in weights.values())
    assert sum(sizes) == total and min(sizes) > 0.45 * total  # two halves of the fp32 weights


@needs_deepspeed
@pytest.mark.slow
def test_cli_train_sharding_zero1(tiny_world, world_cache, tmp_path, family_runs):
    """``alignlab train sft --num-processes 2 --set train.sharding=zero1`` (the field, no
    accelerate environment) equals the 1-process run with 2 accumulated micro-batches, and its
    ``final/`` is a plain model."""
    import os
    import subprocess
    import sys

    from tests.test_distributed import SRC, _check_cli_run, _sft_command

    out = tmp_path / "run"
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    env = {**{k: v for k, v in os.environ.items() if k not in ACCELERATE_VARS},
           "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "ALIGNLAB_DIST_TIMEOUT_MIN": "10"}
    done = subprocess.run([sys.executable, "-m", "alignlab", *_sft_command(out, world_cache),
                           "--num-processes", "2", "--set", "train.sharding=zero1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert "train.sharding zero1: DeepSpeed ZeRO stage 1 over 2 processes" in done.stdout
    # DeepSpeed's reduction averages (the loss is multiplied by 2, the sum divided by 2) and
    # AdamW updates its flat fp32 partitions: a weight may land an ulp (~1.2e-7 near 1) away
    _check_cli_run(done, out, family_runs, weight_tol=3e-7)
