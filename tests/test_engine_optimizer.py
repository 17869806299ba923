"""The optimiser step, the LR schedule and the learner's update, by hand on one- or two-weight
models (fast: no transformer; these are the tests ``tools/mutate.py`` runs for the engine)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from alignlab.core.config import TrainSection
from alignlab.core.errors import NonFiniteError
from alignlab.engine.learner import Learner, Units, rows_of
from alignlab.engine.loop import (
    LossOutput,
    build_optimizer,
    build_scheduler,
    forward_backward,
    optimizer_step,
    train,
)

CPU = torch.device("cpu")


def _param(*values: float) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=torch.float32))


def _sgd_with_grad(grad: list[float], lr: float = 1.0) -> tuple[nn.Parameter, torch.optim.SGD]:
    w = _param(*[0.0] * len(grad))
    w.grad = torch.tensor(grad)
    return w, torch.optim.SGD([w], lr=lr)


# ---- optimizer_step -------------------------------------------------------------------------

def test_optimizer_step_clips_before_stepping_and_returns_the_unclipped_norm():
    w, opt = _sgd_with_grad([3.0, 4.0])  # norm 5
    norm = optimizer_step([w], opt, max_grad_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(w.detach(), torch.tensor([-0.6, -0.8]))  # lr · g · 1/5
    assert w.grad is None  # zeroed (set to None) after the step


def test_optimizer_step_below_the_clip_threshold_and_without_clipping_is_the_plain_step():
    w, opt = _sgd_with_grad([0.3, 0.4])
    assert optimizer_step([w], opt, max_grad_norm=1.0).item() == pytest.approx(0.5)
    torch.testing.assert_close(w.detach(), torch.tensor([-0.3, -0.4]))
    w, opt = _sgd_with_grad([3.0, 4.0], lr=0.5)
    assert optimizer_step([w], opt, max_grad_norm=None).item() == pytest.approx(5.0)
    torch.testing.assert_close(w.detach(), torch.tensor([-1.5, -2.0]))


def test_grad_norm_without_clipping_spans_every_parameter_and_skips_those_without_grad():
    a, b, c = _param(0.0), _param(0.0, 0.0), _param(0.0)
    a.grad, b.grad = torch.tensor([2.0]), torch.tensor([1.0, 2.0])  # c has no grad
    norm = optimizer_step([a, b, c], torch.optim.SGD([a, b, c], lr=1.0), None)
    assert norm.item() == pytest.approx(3.0)
    assert c.item() == 0.0 and a.item() == -2.0


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_gradient_raises_and_leaves_the_weights_unchanged(max_grad_norm, bad):
    w = _param(1.0, 2.0)
    w.grad = torch.tensor([bad, 1.0])
    opt = torch.optim.SGD([w], lr=1.0)
    with pytest.raises(NonFiniteError, match="step 7: the gradient norm"):
        optimizer_step([w], opt, max_grad_norm, step=7)
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, 2.0]))


# ---- build_scheduler / build_optimizer --------------------------------------------------------

def _lrs(cfg: TrainSection, steps: int) -> list[float]:
    """The learning rate of optimizer steps 1..steps (the schedule steps once after each)."""
    opt = torch.optim.SGD([_param(0.0)], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _cos(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind, after_warmup", [
    ("cosine", [_cos(p / 4) for p in range(5)] + [0.0]),
    ("linear", [1 - p / 4 for p in range(5)] + [0.0]),
    ("constant", [1.0] * 6),
])
def test_lr_schedule_per_step_warmup_then_decay(kind, after_warmup):
    cfg = TrainSection(lr=2.0, warmup_steps=2, max_steps=6, lr_scheduler=kind)
    expected = [2.0 * f for f in [0.5, 1.0, *after_warmup]]
    assert _lrs(cfg, 8) == pytest.approx(expected, abs=1e-12)


def test_lr_schedule_without_warmup_starts_at_the_full_rate():
    cfg = TrainSection(lr=1.0, warmup_steps=0, max_steps=4, lr_scheduler="linear")
    assert _lrs(cfg, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_schedule_whose_warmup_spans_every_step_ends_at_the_full_rate(kind):
    # past the warmup with no decay steps left: progress (step − warmup) / max(1, 2 − warmup) = 0
    for warmup, expected in ((2, [1.0, 2.0, 2.0]), (3, [2 / 3, 4 / 3, 2.0])):
        cfg = TrainSection(lr=2.0, warmup_steps=warmup, max_steps=2, lr_scheduler=kind)
        assert _lrs(cfg, 3) == pytest.approx(expected)


def test_optimizer_groups_decay_only_matrices_outside_norms():
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    model.add_module("norm_proj", nn.Linear(3, 3, bias=False))
    model[0].bias.requires_grad_(False)
    cfg = TrainSection(lr=0.3, weight_decay=0.05, adam_betas=(0.8, 0.9))
    opt = build_optimizer(model, cfg)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 2])]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {tuple(p.shape) for p in no_decay["params"]} == {(3,), (3, 3)}
    assert len(no_decay["params"]) == 3  # LayerNorm weight and bias, norm_proj weight
    assert decay["lr"] == 0.3 and decay["betas"] == (0.8, 0.9)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, cfg)


# ---- forward_backward -----------------------------------------------------------------------

class Linear1(nn.Module):
    def __init__(self, w: float = 1.0) -> None:
        super().__init__()
        self.w = _param(w)


class WeightedSum:
    """loss_sum = w · Σ x over the batch's items; num_items = their count."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def num_items(self, batch):
        return batch["x"].numel()

    def loss(self, model, batch):
        self.seen.append(batch["x"].numel())
        return LossOutput((model.w * batch["x"]).sum(), {"x_mean": batch["x"].mean().item()})


def test_forward_backward_divides_every_micro_batch_by_the_window_total():
    model = Linear1(2.0)
    micro = [{"x": torch.tensor([1.0, 2.0, 3.0])}, {"x": torch.tensor([4.0])}]
    loss, denom, metrics = forward_backward(model, WeightedSum(), micro, CPU)
    assert denom == 4.0
    assert loss == pytest.approx(2.0 * 10 / 4)
    assert model.w.grad.item() == pytest.approx(10 / 4)
    # weighted by the micro-batches' items: the window's mean (10 / 4), not the mean of the
    # micro-batch means ((2 + 4) / 2), which would change with the split
    assert metrics == {"x_mean": pytest.approx(10 / 4)}


def test_forward_backward_stops_on_an_empty_window_and_a_non_finite_loss():
    with pytest.raises(NonFiniteError, match="nothing to train on"):
        forward_backward(Linear1(), WeightedSum(), [{"x": torch.zeros(0)}], CPU, step=3)
    model = Linear1()
    micro = [{"x": torch.tensor([1.0])}, {"x": torch.tensor([math.inf])}]
    with pytest.raises(NonFiniteError, match="step 4, micro-batch 2: the loss is inf"):
        forward_backward(model, WeightedSum(), micro, CPU, step=4, context={"loss": 0.5})


# ---- train: one optimizer step and one schedule step per update ------------------------------

def test_train_logs_the_schedule_of_each_step_and_applies_the_clipped_update(tmp_path):
    model = Linear1(0.0)
    cfg = TrainSection(output_dir=str(tmp_path / "run"), max_steps=4, lr=0.1, warmup_steps=1,
                       lr_scheduler="linear", max_grad_norm=0.5, grad_accum=2, log_every=1,
                       device="cpu", precision="fp32", tensorboard=False, progress=False)
    batches = [{"x": torch.tensor([2.0, 2.0])}] * 8
    logged = []
    result = train(model, WeightedSum(), batches, cfg, on_step=lambda s, m: logged.append((s, m)))
    assert result.step == 4 and [s for s, _ in logged] == [1, 2, 3, 4]
    # factor(k) after step k: warmup 1 step, then 1 − (k − 1)/3
    assert [m["lr"] for _, m in logged] == pytest.approx([0.1, 0.1 * 2 / 3, 0.1 / 3, 0.0])
    assert all(m["grad_norm"] == pytest.approx(2.0) for _, m in logged)  # d(w·mean x)/dw
    assert all(m["num_items"] == 4.0 for _, m in logged)
    assert [m["loss"] for _, m in logged][0] == 0.0
    # AdamW's first steps move w by about lr each (the clipped gradient has a constant sign)
    assert model.w.item() == pytest.approx(-(0.1 + 0.1 + 0.2 / 3 + 0.1 / 3), rel=1e-3)
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]


# ---- Learner.update ---------------------------------------------------------------------------

def _learner(**kw) -> tuple[Learner, WeightedSum]:
    objective = WeightedSum()
    cfg = TrainSection(lr=1.0, max_steps=4, warmup_steps=0, lr_scheduler="linear",
                       max_grad_norm=kw.pop("max_grad_norm", None), batch_size=2,
                       device="cpu", precision="fp32")
    return Learner(Linear1(0.0), objective, cfg, **kw), objective


def test_learner_update_steps_once_per_minibatch_and_the_schedule_once_per_update():
    learner, objective = _learner(epochs=2, minibatch_size=3, micro_batch_size=2)
    units = rows_of({"x": torch.arange(1.0, 6.0)[:, None]})  # 5 units
    out = learner.update(units)
    assert out["optimizer_steps"] == 4  # 2 epochs × (3 + 2)
    assert learner.updates == 4
    assert objective.seen == [2, 1, 2] * 2  # minibatch 3 → micro 2 + 1, then the last 2
    assert out["lr"] == pytest.approx(0.75)
    assert learner.update(units)["lr"] == pytest.approx(0.5)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_learner_update_averages_metrics_over_its_steps_and_skips_empty_micro_batches():
    learner, objective = _learner(epochs=1, minibatch_size=2)
    xs = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    out = learner.update(Units(4, lambda idx: {"x": xs[idx]}))
    assert out["optimizer_steps"] == 2
    assert out["x_mean"] == pytest.approx(4.0)  # (mean of one minibatch + the other) / 2
    assert out["grad_norm"] == pytest.approx(4.0)
    learner2, objective2 = _learner(epochs=1)
    empty = Units(3, lambda idx: {"x": torch.zeros(0)})
    out = learner2.update(empty)
    assert out["optimizer_steps"] == 0 and objective2.seen == []
    assert learner2.model.w.item() == 0.0


def test_learner_clips_with_the_configured_norm_and_restores_its_state():
    learner, _ = _learner(epochs=1, max_grad_norm=0.5)
    units = rows_of({"x": torch.tensor([[4.0], [4.0]])})
    assert learner.update(units)["grad_norm"] == pytest.approx(4.0)
    state = copy.deepcopy(learner.state_dict())  # as if saved: no tensor shared with learner
    assert state["updates"] == 1
    again, _ = _learner(epochs=1, max_grad_norm=0.5)
    again.load_state_dict(state)
    assert again.updates == 1 and again.scheduler.get_last_lr() == learner.scheduler.get_last_lr()
    assert torch.equal(torch.randperm(5, generator=again.generator),
                       torch.randperm(5, generator=learner.generator))
    # AdamW's moments carry over: from the same weight, the next update lands on the same weight
    # (a fresh AdamW would move by the full lr, 0.75, against the restored one's 0.04)
    with torch.no_grad():
        again.model.w.copy_(learner.model.w)
    units = rows_of({"x": torch.tensor([[1.0], [-3.0]])})
    learner.update(units)
    again.update(units)
    assert again.model.w.item() == pytest.approx(learner.model.w.item(), rel=1e-6)


class Recording(WeightedSum):
    """Also records the x values of every micro-batch, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[float] = []

    def loss(self, model, batch):
        self.order += batch["x"].flatten().tolist()
        return super().loss(model, batch)


def _cfg(**kw) -> TrainSection:
    return TrainSection(**{"lr": 1.0, "max_steps": 4, "lr_scheduler": "constant", "batch_size": 8,
                           "device": "cpu", "precision": "fp32", **kw})


def test_learner_defaults_one_epoch_shuffled_by_its_own_seeded_generator():
    """Minibatches are drawn by the learner's own seeded generator; inside one, the micro-batches
    take its units in index order (a prompt's completions stay together for prefix sharing)."""
    units = rows_of({"x": torch.arange(8.0)[:, None]})
    orders = []
    for kw in ({}, {"seed": 0}, {"seed": 1}):
        objective = Recording()
        torch.manual_seed(len(orders))  # the global RNG must not matter
        learner = Learner(Linear1(0.0), objective, _cfg(batch_size=2), minibatch_size=4, **kw)
        assert learner.update(units)["optimizer_steps"] == 2  # default: one epoch
        orders.append(objective.order)
    assert orders[0] == orders[1] != orders[2]
    for order in orders:
        assert sorted(order) == list(range(8))
        assert order[:4] == sorted(order[:4]) and order[4:] == sorted(order[4:])
    assert {tuple(o[:4]) for o in orders} != {tuple(range(4))}  # not the index order overall


def test_learner_trains_in_train_mode_with_extra_groups_inside_the_clip():
    model = Linear1(0.0).eval()
    head = _param(0.0)

    class TwoWeights(WeightedSum):
        def loss(self, model, batch):
            out = super().loss(model, batch)
            return LossOutput(out.loss_sum + (head * batch["x"]).sum() * 0.75, out.metrics)

    learner = Learner(model, TwoWeights(), _cfg(max_grad_norm=0.1),
                      extra_groups=({"params": [head], "lr": 0.5},))
    group = learner.optimizer.param_groups[-1]
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.0
    assert any(p is head for p in learner.params)
    out = learner.update(rows_of({"x": torch.tensor([[4.0]])}))
    assert model.training
    assert out["grad_norm"] == pytest.approx((4.0 ** 2 + 3.0 ** 2) ** 0.5)  # both weights
    assert head.item() != 0.0


def test_learner_errors_name_the_update_that_failed():
    learner, _ = _learner(epochs=1)
    learner.update(rows_of({"x": torch.tensor([[1.0]])}))
    with pytest.raises(NonFiniteError, match="step 2, micro-batch 1: the loss is -?inf"):
        learner.update(rows_of({"x": torch.tensor([[math.inf]])}))

    class Squared(WeightedSum):
        def loss(self, model, batch):  # at w = 0: a finite loss 0, an infinite gradient x²
            return LossOutput((model.w * batch["x"] * batch["x"]).sum(), {})

    learner = Learner(Linear1(0.0), Squared(), _cfg())
    with pytest.raises(NonFiniteError, match="step 1: the gradient norm is inf"):
        learner.update(rows_of({"x": torch.tensor([[1e30]])}))


def test_learner_enables_gradient_checkpointing_when_configured():
    from alignlab.models.checkpointing import checkpointing_enabled

    from tests.conftest import random_llama

    model = random_llama(layers=1)
    Learner(model, WeightedSum(), _cfg(gradient_checkpointing=True))
    assert checkpointing_enabled(model)


# ---- train: mode, resume of the data position, error context ----------------------------------

class Stream:
    """Batches x = 0, 1, 2, ... whose position is checkpointed like ``EpochBatches``."""

    def __init__(self) -> None:
        self.pos, self.loaded = 0, None

    def __iter__(self):
        while True:
            self.pos += 1
            yield {"x": torch.tensor([float(self.pos - 1)])}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.loaded, self.pos = state, state["pos"]


class InTrainMode(Recording):
    def loss(self, model, batch):
        assert model.training
        return super().loss(model, batch)


def _train_cfg(tmp_path, **kw) -> TrainSection:
    return TrainSection(**{"output_dir": str(tmp_path / "run"), "max_steps": 2, "lr": 0.1,
                           "lr_scheduler": "constant", "log_every": 1, "device": "cpu",
                           "precision": "fp32", "tensorboard": False, "progress": False, **kw})


def test_train_resumes_the_data_position_optimizer_and_schedule_in_train_mode(tmp_path):
    def run(out, steps, **kw):
        model, objective, stream, logged = Linear1(0.0).eval(), InTrainMode(), Stream(), []
        cfg = _train_cfg(tmp_path / out, **{"max_steps": steps, "save_every": 2,
                                             "lr_scheduler": "linear", **kw})
        train(model, objective, stream, cfg, on_step=lambda s, m: logged.append(m))
        return model, objective, stream, logged

    run("split", 2)
    _, objective, stream, logged = run("split", 4, resume=True)
    assert stream.loaded == {"pos": 2} and objective.order == [2.0, 3.0]
    # the resumed schedule continues: factor 1 − k/4 after step k, not a fresh schedule's
    assert [m["lr"] for m in logged] == pytest.approx([0.1 * 0.25, 0.0])
    assert all(0 <= m["step_time"] < 60 for m in logged)
    # with a constant rate, 2 + 2 resumed steps are the 4 uninterrupted ones (AdamW's moments)
    whole = run("whole", 4, lr_scheduler="constant")[0]
    run("halves", 2, lr_scheduler="constant")
    resumed = run("halves", 4, lr_scheduler="constant", resume=True)[0]
    assert resumed.w.item() == pytest.approx(whole.w.item(), rel=1e-6)


def test_loss_output_metrics_default_to_an_empty_dict():
    assert LossOutput(torch.tensor(1.0)).metrics == {}


def test_train_errors_name_the_step_and_the_last_metrics(tmp_path):
    def inf_at_step_two():
        yield {"x": torch.tensor([1.0])}
        yield {"x": torch.tensor([math.inf])}

    with pytest.raises(NonFiniteError, match=r"step 2, micro-batch 1: .*'loss': 1\.0"):
        train(Linear1(1.0), WeightedSum(), inf_at_step_two(), _train_cfg(tmp_path))

    class Squared(WeightedSum):
        def loss(self, model, batch):  # at w = 0 the second batch has an infinite gradient
            return LossOutput((model.w * batch["x"] * batch["x"]).sum(), {})

    batches = iter([{"x": torch.tensor([0.0])}, {"x": torch.tensor([1e30])}])
    with pytest.raises(NonFiniteError, match="step 2: the gradient norm is inf"):
        train(Linear1(0.0), Squared(), batches, _train_cfg(tmp_path / "b", max_grad_norm=None))


def test_optimizer_step_defaults_and_no_gradient_at_all():
    w = _param(1.0)
    assert optimizer_step([w], torch.optim.SGD([w], lr=1.0), None).item() == 0.0
    w.grad = torch.tensor([math.inf])
    with pytest.raises(NonFiniteError, match="step 0:"):
        optimizer_step([w], torch.optim.SGD([w], lr=1.0), None)


def test_adamw_is_fused_for_float_parameters_on_one_device():
    assert build_optimizer(nn.Linear(2, 2), TrainSection()).defaults["fused"] is True
