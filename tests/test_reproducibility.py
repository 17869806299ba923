"""Same seed, same weights: two LoRA runs agree exactly, and so do a killed-and-resumed run and
an uninterrupted one (issue 15). LoRA's adapters are initialised at random, so every RNG must be
seeded before the model is built, not only inside the loop."""

from __future__ import annotations

import pytest
import torch

from alignlab.algorithms import sft
from alignlab.algorithms.preference import trainer as preference
from alignlab.algorithms.preference.trainer import (
    PreferenceConfig,
    PreferenceSection,
    run_preference,
)
from alignlab.algorithms.sft import SFTConfig, run_sft
from alignlab.core.config import DataSection, LoraSettings, ModelSection, TrainSection, WorldSection

LORA = LoraSettings(r=4, alpha=8, dropout=0.1)  # dropout: the RNG state must resume too


class Killed(Exception):
    pass


def _train(out, resume=False, save_every=None):
    return TrainSection(output_dir=str(out), max_steps=4, batch_size=4, lr=1e-3, log_every=1,
                        save_every=save_every, resume=resume, progress=False, tensorboard=False,
                        precision="fp32", seed=3)


def _sft(world_cache, out, **train):
    return SFTConfig(model=ModelSection(lora=LORA),
                     data=DataSection(source="world:positive", limit=32, max_length=64),
                     train=_train(out, **train), world=WorldSection(preset="tiny", cache_dir=world_cache))


def _dpo(world_cache, out, **train):
    return PreferenceConfig(model=ModelSection(lora=LORA),
                            data=DataSection(source="world:positive", limit=32, max_length=64),
                            train=_train(out, **train),
                            world=WorldSection(preset="tiny", cache_dir=world_cache),
                            preference=PreferenceSection(loss="dpo"))


TRAINERS = {"sft": (sft, run_sft, _sft), "dpo": (preference, run_preference, _dpo)}


def _weights(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("name", TRAINERS)
def test_lora_runs_with_the_same_seed_are_identical(name, tiny_world, world_cache, tmp_path):
    _, run, cfg = TRAINERS[name]
    first, second = (_weights(run(cfg(world_cache, tmp_path / d))) for d in ("a", "b"))
    assert any("lora" in k for k in first)
    _assert_equal(first, second)


@pytest.mark.parametrize("name", TRAINERS)
def test_lora_resume_equals_the_uninterrupted_run(name, tiny_world, world_cache, tmp_path, monkeypatch):
    module, run, cfg = TRAINERS[name]
    full = _weights(run(cfg(world_cache, tmp_path / "full", save_every=2)))
    real_train = module.train

    def killed_at_step_3(*args, on_step=None, **kwargs):
        def step(i, metrics):
            if on_step is not None:
                on_step(i, metrics)
            if i == 3:  # past the step-2 checkpoint
                raise Killed
        return real_train(*args, on_step=step, **kwargs)

    monkeypatch.setattr(module, "train", killed_at_step_3)
    with pytest.raises(Killed):
        run(cfg(world_cache, tmp_path / "run", save_every=2))
    monkeypatch.setattr(module, "train", real_train)
    resumed = run(cfg(world_cache, tmp_path / "run", save_every=2, resume=True))
    assert resumed.result.history[0]["step"] == 3
    _assert_equal(full, _weights(resumed))
