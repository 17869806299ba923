"""The training loop's plumbing, observed on one-weight models: seeding, moving the model and
every micro-batch to the device, gradient checkpointing, resuming with another kind of batch
source, the timings it reports. Written against the survivors of ``tools/mutate.py`` for
``engine/loop.py`` (fast: ``tools/mutate.py`` runs these for the engine)."""

from __future__ import annotations

import time

import pytest
import torch

from alignlab.core.errors import NonFiniteError
from alignlab.engine.loop import LossOutput, forward_backward, train

from tests.test_engine_optimizer import CPU, Linear1, Stream, WeightedSum, _train_cfg


class Noisy(WeightedSum):
    """loss_sum = w · Σ x·u with u ~ U(0, 1) from the global torch RNG; records every u."""

    def __init__(self) -> None:
        super().__init__()
        self.noise: list[float] = []

    def loss(self, model, batch):
        u = torch.rand(())
        self.noise.append(u.item())
        return LossOutput((model.w * batch["x"] * u).sum())


def test_train_seeds_every_rng_from_cfg_seed_whatever_the_global_state(tmp_path):
    def run(out, global_seed, seed):
        torch.manual_seed(global_seed)  # the caller's RNG state must not matter
        model, objective = Linear1(0.0), Noisy()
        train(model, objective, [{"x": torch.tensor([1.0])}] * 3,
              _train_cfg(tmp_path / out, max_steps=3, seed=seed))
        return objective.noise, model.w.item()

    first, second, other = run("a", 1, seed=5), run("b", 2, seed=5), run("c", 1, seed=6)
    assert first == second
    assert first[0] != other[0]
    torch.manual_seed(5)
    assert first[0][0] == torch.rand(()).item()  # the first draw after seed_everything(5)


class RecordsMoves(Linear1):
    def __init__(self) -> None:
        super().__init__(0.0)
        self.moved_to: list[object] = []

    def to(self, *args, **kwargs):
        self.moved_to.append(args[0] if args else kwargs.get("device"))
        return super().to(*args, **kwargs)


def test_train_moves_the_model_to_the_configured_device(tmp_path):
    model = RecordsMoves()
    train(model, WeightedSum(), [{"x": torch.tensor([1.0])}], _train_cfg(tmp_path, max_steps=1))
    assert model.moved_to == [CPU]


class SeesDevices(WeightedSum):
    """Records the device of each micro-batch's tensor; its loss only reads the weight, so the
    batch may live on the meta device (the only other device every machine has)."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[torch.device] = []
        self.tags: list[str] = []

    def num_items(self, batch):
        return 1.0

    def loss(self, model, batch):
        self.devices.append(batch["x"].device)
        self.tags.append(batch["tag"])
        return LossOutput(model.w.sum() * 2.0)


def test_forward_backward_moves_every_micro_batch_to_the_device():
    model, objective = Linear1(1.0), SeesDevices()
    micro = [{"x": torch.tensor([1.0]), "tag": "a"}, {"x": torch.tensor([2.0]), "tag": "b"}]
    loss, denom, _ = forward_backward(model, objective, micro, torch.device("meta"))
    assert objective.devices == [torch.device("meta")] * 2
    assert objective.tags == ["a", "b"]  # values that are not tensors pass through as they are
    assert (loss, denom) == (pytest.approx(2.0), 2.0)
    assert micro[0]["x"].device == CPU  # the caller's batch is not changed in place


def test_forward_backward_names_step_zero_by_default():
    with pytest.raises(NonFiniteError, match="step 0: the batch has nothing to train on"):
        forward_backward(Linear1(), WeightedSum(), [{"x": torch.zeros(0)}], CPU)


class LlamaLoss:
    """The mean logit of one short sequence: a forward through the decoder layers."""

    def __init__(self) -> None:
        self.steps = 0

    def num_items(self, batch):
        return 1.0

    def loss(self, model, batch):
        self.steps += 1
        return LossOutput(model(input_ids=batch["input_ids"], use_cache=False).logits.float().mean())


def test_train_enables_gradient_checkpointing_when_configured(tmp_path):
    from alignlab.models.checkpointing import checkpointing_enabled

    from tests.conftest import random_llama

    for enabled in (True, False):
        model, objective = random_llama(layers=1), LlamaLoss()
        cfg = _train_cfg(tmp_path / str(enabled), max_steps=1, gradient_checkpointing=enabled)
        train(model, objective, [{"input_ids": torch.tensor([[1, 2, 3]])}], cfg)
        assert checkpointing_enabled(model) is enabled and objective.steps == 1


def test_train_resumes_from_a_checkpointed_stream_with_a_plain_list_and_vice_versa(tmp_path):
    # A list has no data position to restore; a stream resumed after a list (no "data" in the
    # checkpoint) starts from its beginning. Neither may fail.
    one = [{"x": torch.tensor([1.0])}] * 4
    train(Linear1(0.0), WeightedSum(), Stream(), _train_cfg(tmp_path / "s", save_every=1))
    result = train(Linear1(0.0), WeightedSum(), one,
                   _train_cfg(tmp_path / "s", max_steps=3, save_every=1, resume=True))
    assert result.step == 3 and [h["step"] for h in result.history][-1] == 3
    train(Linear1(0.0), WeightedSum(), one, _train_cfg(tmp_path / "l", save_every=1))
    stream = Stream()
    train(Linear1(0.0), WeightedSum(), stream,
          _train_cfg(tmp_path / "l", max_steps=3, save_every=1, resume=True))
    assert stream.loaded is None and stream.pos == 1


def test_train_reports_its_wall_time_and_each_step_time(tmp_path):
    logged = []
    start = time.time()
    result = train(Linear1(0.0), WeightedSum(), [{"x": torch.tensor([1.0])}] * 3,
                   _train_cfg(tmp_path, max_steps=3), on_step=lambda s, m: logged.append(m))
    wall = time.time() - start
    assert 0.0 <= result.seconds <= wall
    assert all(0.0 <= m["step_time"] <= result.seconds for m in logged)
