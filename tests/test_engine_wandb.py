"""Weights & Biases as a metrics sink (``train.report_to: [wandb]``), against a stand-in
``wandb`` module that records what the run sends (wandb itself is an optional extra)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from alignlab.core.config import TrainSection, load_config
from alignlab.core.errors import ConfigError
from alignlab.data.batches import EpochBatches
from alignlab.data.collate import pad_collate
from alignlab.engine.loop import train
from alignlab.engine.objectives import NLLObjective
from alignlab.engine.run import prepare_run

from tests.conftest import random_examples, random_llama


class FakeRun:
    def __init__(self, **kwargs) -> None:
        self.kwargs, self.logged, self.finished = kwargs, [], False
        self.id = kwargs.get("id") or "run-abc"

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs: list[FakeRun] = []
    module = types.ModuleType("wandb")
    module.__spec__ = types.SimpleNamespace(name="wandb")  # found by importlib.util.find_spec

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def _cfg(out, **kw) -> TrainSection:
    base = dict(output_dir=str(out), max_steps=3, batch_size=2, lr=1e-3, precision="fp32",
                device="cpu", log_every=1, save_every=3, progress=False, tensorboard=False,
                seed=5, report_to=["wandb"])
    base.update(kw)
    return TrainSection(**base)


def _batches():
    return EpochBatches(random_examples(8, seed=3), 2, lambda ex: pad_collate(ex, 0), seed=5)


def test_metrics_reach_wandb_with_their_steps_and_a_resume_continues_the_run(tmp_path,
                                                                             fake_wandb):
    train(random_llama(), NLLObjective(), _batches(), _cfg(tmp_path))
    run = fake_wandb[0]
    assert run.kwargs["id"] is None and run.kwargs["resume"] == "allow"
    assert run.kwargs["dir"] == str(tmp_path) and run.kwargs["name"] == tmp_path.name
    assert run.kwargs["config"]["train"]["report_to"] == ["wandb"]
    assert [step for step, _ in run.logged] == [1, 2, 3] and run.finished
    jsonl = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [data["loss"] for _, data in run.logged] == [row["loss"] for row in jsonl]
    assert "step" not in run.logged[0][1] and "time" not in run.logged[0][1]
    assert (tmp_path / "wandb_run_id").read_text().strip() == "run-abc"

    train(random_llama(), NLLObjective(), _batches(), _cfg(tmp_path, max_steps=5, resume=True))
    resumed = fake_wandb[1]
    assert resumed.kwargs["id"] == "run-abc"  # the same W&B run, not a new one
    assert [step for step, _ in resumed.logged] == [4, 5]


def test_wandb_missing_is_a_config_error_before_anything_loads(tmp_path, monkeypatch):
    from alignlab.algorithms.sft import SFTConfig

    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable
    cfg = SFTConfig(train=_cfg(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"train.report_to.*pip install wandb"):
        prepare_run(cfg)
    with pytest.raises(ConfigError, match=r"train.report_to.0.*'mlflow'.*allowed values: 'wandb'"):
        load_config(SFTConfig, None, ["train.report_to=[mlflow]"])
