"""The run directory: no silent reuse, DONE only after the final model, resume without repeated
metrics, damaged or missing checkpoints, stop signals, a full disk, a run that never learned."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch

from alignlab.algorithms.sft import SFTConfig, run_sft
from alignlab.core.config import DataSection, TrainSection, WorldSection
from alignlab.core.errors import ConfigError, TrainingError
from alignlab.data.batches import EpochBatches
from alignlab.data.collate import pad_collate
from alignlab.engine import checkpoint as checkpoint_module
from alignlab.engine.checkpoint import CheckpointError, latest_checkpoint
from alignlab.engine.loop import train
from alignlab.engine.objectives import NLLObjective
from alignlab.engine.run import Interrupted, prepare_output_dir

from tests.conftest import random_examples, random_llama


def _cfg(out, **kw) -> TrainSection:
    base = dict(output_dir=str(out), max_steps=6, batch_size=2, lr=3e-3, precision="fp32",
                device="cpu", log_every=1, save_every=2, progress=False, tensorboard=False,
                seed=5)
    base.update(kw)
    return TrainSection(**base)


def _batches():
    return EpochBatches(random_examples(10, seed=3), 2, lambda ex: pad_collate(ex, 0), seed=5)


def _steps(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


def _kill_at(n):
    def on_step(step, _metrics):
        if step == n:
            raise Killed
    return on_step


def test_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    train(random_llama(), NLLObjective(), _batches(), _cfg(tmp_path, max_steps=2))
    (tmp_path / "reference_logps.safetensors").write_bytes(b"cache")
    with pytest.raises(ConfigError, match=r"train.output_dir.*earlier run.*train.resume=true.*"
                                          r"train.overwrite=true"):
        train(random_llama(), NLLObjective(), _batches(), _cfg(tmp_path, max_steps=2))
    prepare_output_dir(_cfg(tmp_path, overwrite=True))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "reference_logps.safetensors").read_bytes() == b"cache"  # caches stay
    train(random_llama(), NLLObjective(), _batches(), _cfg(tmp_path, max_steps=2))
    assert _steps(tmp_path) == [1, 2]


def test_an_output_dir_that_is_a_file_or_cannot_be_made_is_refused_first(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_output_dir(_cfg(tmp_path / "file"))
    with pytest.raises(ConfigError, match="cannot create"):
        prepare_output_dir(_cfg(tmp_path / "file" / "run"))


def test_sft_checks_the_output_dir_before_loading_anything(tmp_path, monkeypatch):
    import alignlab.algorithms.common as common

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(common, "load_policy", lambda *a: pytest.fail("loaded before the check"))
    cfg = SFTConfig(train=_cfg(tmp_path / "file"), data=DataSection(source="x.jsonl"))
    with pytest.raises(ConfigError, match="train.output_dir"):
        run_sft(cfg)


def test_done_is_written_after_the_final_model_and_never_by_a_crashed_run(world_cache, tmp_path):
    cfg = SFTConfig(world=WorldSection(preset="tiny", cache_dir=world_cache),
                    data=DataSection(source="world:positive", limit=16),
                    train=_cfg(tmp_path / "ok", max_steps=2, batch_size=4))
    run_sft(cfg)
    assert (tmp_path / "ok" / "DONE").exists() and (tmp_path / "ok" / "final").is_dir()
    with pytest.raises(Killed):
        train(random_llama(), NLLObjective(), _batches(), _cfg(tmp_path / "crash"),
              on_step=_kill_at(3))
    assert not (tmp_path / "crash" / "DONE").exists()


def test_resume_says_so_and_logs_no_step_twice(tmp_path, capsys):
    with pytest.raises(Killed):  # step 3 is logged, then the run dies before the step-4 save
        train(random_llama(), NLLObjective(), _batches(), _cfg(tmp_path), on_step=_kill_at(4))
    assert _steps(tmp_path) == [1, 2, 3]
    train(random_llama(), NLLObjective(), _batches(), _cfg(tmp_path, resume=True))
    assert "resumed from step 2" in capsys.readouterr().out
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_a_pointer_to_a_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    train(random_llama(), NLLObjective(), _batches(), _cfg(tmp_path, max_steps=2))
    (tmp_path / "checkpoints" / "latest").write_text("step-0000009\n")
    with pytest.raises(CheckpointError, match="step-0000009.*missing"):
        train(random_llama(), NLLObjective(), _batches(), _cfg(tmp_path, resume=True))


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    full = random_llama(seed=1)
    train(full, NLLObjective(), _batches(), _cfg(tmp_path / "full"))
    with pytest.raises(Killed):
        train(random_llama(seed=1), NLLObjective(), _batches(),
              _cfg(tmp_path / "run", save_total_limit=3), on_step=_kill_at(5))
    latest = latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-0000004"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated on disk
    resumed = random_llama(seed=9)
    with pytest.warns(UserWarning, match="step-0000004 is damaged"):
        train(resumed, NLLObjective(), _batches(), _cfg(tmp_path / "run", resume=True))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # resumed from step 2, same end as uninterrupted


def test_sigint_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    full = random_llama(seed=1)
    train(full, NLLObjective(), _batches(), _cfg(tmp_path / "full"))

    def interrupt(step, _metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match=r"SIGINT at step 3.*train.resume=true"):
        train(random_llama(seed=1), NLLObjective(), _batches(), _cfg(tmp_path / "run"),
              on_step=interrupt)
    assert latest_checkpoint(tmp_path / "run").name == "step-0000003"  # not a save step
    resumed = random_llama(seed=9)
    train(resumed, NLLObjective(), _batches(), _cfg(tmp_path / "run", resume=True))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    real = checkpoint_module.save_model
    calls = []

    def save_model(model, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(model, path)

    monkeypatch.setattr(checkpoint_module, "save_model", save_model)
    with pytest.raises(CheckpointError, match=r"No space left on device.*step-0000002\) is kept"):
        train(random_llama(), NLLObjective(), _batches(), _cfg(tmp_path))
    assert latest_checkpoint(tmp_path).name == "step-0000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000002"]


def test_an_online_run_that_never_updated_fails_without_a_final_model(world_cache, tmp_path):
    from alignlab.algorithms.policy_gradient.config import RLSection
    from alignlab.algorithms.policy_gradient.run import train_policy_gradient

    from tests.conftest import online_config

    cfg = online_config(world_cache, tmp_path, RLSection(
        reward="tests.test_engine_run:always_fails", on_reward_error="skip"), steps=2)
    cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 2, 6
    with pytest.raises(TrainingError, match="all 2 iterations were skipped"):
        train_policy_gradient(cfg, "grpo")
    assert not (tmp_path / "final").exists() and not (tmp_path / "DONE").exists()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_skipped"] for r in rows] == [8, 8]


def always_fails(prompts, completions, **fields):
    raise ValueError("the scorer is down")
