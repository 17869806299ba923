"""The shared training loop: exact gradient accumulation, exact resume, NaN stop, logging."""

from __future__ import annotations

import json

import pytest
import torch

from alignlab.core.config import TrainSection
from alignlab.core.errors import NonFiniteError
from alignlab.data.batches import EpochBatches
from alignlab.data.collate import pad_collate
from alignlab.engine.checkpoint import latest_checkpoint
from alignlab.engine.loop import LossOutput, forward_backward, train
from alignlab.engine.objectives import NLLObjective

from tests.conftest import random_examples, random_llama

CPU = torch.device("cpu")


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_equals_large_batch():
    examples = random_examples(8, seed=1)
    k, b = 4, 2
    big = random_llama()
    loss_big, n_big, _ = forward_backward(big, NLLObjective(), [pad_collate(examples, 0)], CPU)
    small = random_llama()
    micro = [pad_collate(examples[i * b:(i + 1) * b], 0) for i in range(k)]
    loss_small, n_small, _ = forward_backward(small, NLLObjective(), micro, CPU)
    assert n_big == n_small
    assert loss_small == pytest.approx(loss_big, abs=1e-5)
    g_big, g_small = _grads(big), _grads(small)
    assert g_big.keys() == g_small.keys() and g_big
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], atol=1e-5, rtol=1e-4)


def test_averaging_micro_batch_means_would_differ():
    """Guards the test above: with uneven lengths, mean-of-means is not the large-batch loss."""
    examples = random_examples(8, seed=1)
    model = random_llama()
    obj = NLLObjective()
    with torch.no_grad():
        means = [obj.loss(model, pad_collate(examples[i:i + 2], 0)).loss_sum
                 / obj.num_items(pad_collate(examples[i:i + 2], 0)) for i in range(0, 8, 2)]
        full = obj.loss(model, pad_collate(examples, 0)).loss_sum / obj.num_items(pad_collate(examples, 0))
    assert abs(float(sum(means) / 4) - float(full)) > 1e-4


def _cfg(tmp_path, **kw) -> TrainSection:
    base = dict(output_dir=str(tmp_path), max_steps=7, batch_size=2, grad_accum=2, lr=3e-3,
                precision="fp32", device="cpu", log_every=1, save_every=3, progress=False,
                tensorboard=True, warmup_steps=2, lr_scheduler="cosine", seed=5)
    base.update(kw)
    return TrainSection(**base)


def _batches(seed=5):
    return EpochBatches(random_examples(10, seed=3), 2, lambda ex: pad_collate(ex, 0), seed=seed)


def test_kill_and_resume_gives_identical_weights(tmp_path):
    full = random_llama(seed=7)
    train(full, NLLObjective(), _batches(), _cfg(tmp_path / "full"))

    class Killed(Exception):
        pass

    def kill(step, _metrics):
        if step == 5:  # past the step-3 checkpoint, mid-way to the next one
            raise Killed

    interrupted = random_llama(seed=7)
    with pytest.raises(Killed):
        train(interrupted, NLLObjective(), _batches(), _cfg(tmp_path / "run"), on_step=kill)
    assert latest_checkpoint(tmp_path / "run").name == "step-0000003"

    resumed = random_llama(seed=99)  # different init: every weight must come from the checkpoint
    result = train(resumed, NLLObjective(), _batches(), _cfg(tmp_path / "run", resume=True))
    assert result.step == 7
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_without_checkpoint_starts_fresh_and_logs(tmp_path):
    model = random_llama()
    result = train(model, NLLObjective(), _batches(), _cfg(tmp_path, max_steps=4, resume=True))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all({"loss", "grad_norm", "lr"} <= x.keys() for x in lines)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert result.step == 4
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-0000003", "step-0000004"]  # save_total_limit=2, no temp dirs left


class _NaNAfter:
    def __init__(self, good_steps: int) -> None:
        self.calls, self.good = 0, good_steps

    def num_items(self, batch):
        return 1.0

    def loss(self, model, batch):
        self.calls += 1
        value = NLLObjective().loss(model, batch).loss_sum
        return LossOutput(value * float("nan") if self.calls > self.good else value)


def test_nan_loss_stops_with_clear_message(tmp_path):
    model = random_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"step 1, micro-batch 1: the loss is nan"):
        train(model, _NaNAfter(0), _batches(), _cfg(tmp_path, save_every=None))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "weights must not be updated by a NaN step"


def test_empty_loss_mask_is_an_error(tmp_path):
    examples = [{"input_ids": [1, 2, 3], "loss_mask": [0, 0, 0]}] * 4
    batches = EpochBatches(examples, 2, lambda ex: pad_collate(ex, 0))
    with pytest.raises(NonFiniteError, match="nothing to train on"):
        train(random_llama(), NLLObjective(), batches, _cfg(tmp_path))
