"""Activation checkpointing: exact under the one-pass prefix sharing (its attention and last-layer
contexts are re-entered for the recomputation), refused where it cannot be exact, and wired into
the trainers through ``train.gradient_checkpointing``."""

from __future__ import annotations

import pytest
import torch

from alignlab.core.errors import ConfigError
from alignlab.data.preference_batches import collate_groups
from alignlab.models.checkpointing import checkpointing_enabled, enable_gradient_checkpointing
from alignlab.models.logprobs import completion_logprobs

from tests.conftest import random_llama
from tests.test_models_prefix_sharing import _examples, _values_and_grads


@pytest.mark.parametrize("mode", [True, "selective"])
@pytest.mark.parametrize("layout", ["shared", "flat", "packed"])
def test_checkpointed_values_and_gradients_equal_plain(layout, mode):
    examples = _examples("listwise")
    plain = random_llama(seed=7).float().train()
    checkpointed = random_llama(seed=7).float().train()
    enable_gradient_checkpointing(checkpointed, mode)
    assert checkpointing_enabled(checkpointed) and not checkpointing_enabled(plain)
    lp_a, g_a, _ = _values_and_grads(plain, examples, layout)
    lp_b, g_b, _ = _values_and_grads(checkpointed, examples, layout)
    assert torch.allclose(lp_a, lp_b, atol=1e-6)
    assert torch.allclose(g_a, g_b, atol=1e-6), (g_a - g_b).abs().max()


def test_two_pass_prefix_sharing_refuses_checkpointing_and_unsupported_models_are_named():
    model = random_llama(seed=7).float().train()
    model.set_attn_implementation("eager")
    enable_gradient_checkpointing(model)
    with pytest.raises(ValueError, match="KV cache"):
        completion_logprobs(model, collate_groups(_examples("paired"), 0, layout="shared"))
    with pytest.raises(ConfigError, match="train.gradient_checkpointing.*Linear"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="train.gradient_checkpointing.*'some'.*selective"):
        enable_gradient_checkpointing(model, "some")


def test_selective_checkpointing_keeps_the_matmuls_and_reruns_the_rest(monkeypatch):
    """What ``selective`` keeps for backward: the outputs of the matmuls (projections, attention
    scores), not those of the element-wise ops (norms, SiLU, products, softmax), which rerun —
    fewer bytes than every op's output."""
    import alignlab.models.checkpointing as ckpt

    decisions = []
    policy = ckpt._keep_matmuls

    def recording(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if not ctx.is_recompute and isinstance(ctx.op_output, torch.Tensor):
            decisions.append((op, decision, ctx.op_output.numel()))
        return decision

    monkeypatch.setattr(ckpt, "_keep_matmuls", recording)
    model = random_llama(seed=7).float().train()
    enable_gradient_checkpointing(model, "selective")
    completion_logprobs(model, collate_groups(_examples("paired"), 0, layout="flat")).sum().backward()
    kept = {str(op).split(".")[1] for op, d, _ in decisions if d == ckpt.CheckpointPolicy.MUST_SAVE}
    rerun = {str(op).split(".")[1] for op, d, _ in decisions if d != ckpt.CheckpointPolicy.MUST_SAVE}
    assert "mm" in kept and ({"bmm", "baddbmm"} & kept or "_scaled_dot_product_flash_attention_for_cpu" in kept)
    assert {"rsqrt", "silu", "mul"} <= rerun and not kept & rerun
    kept_size = sum(n for _, d, n in decisions if d == ckpt.CheckpointPolicy.MUST_SAVE)
    assert kept_size < 0.6 * sum(n for *_, n in decisions)


def _losses(history, key="loss"):
    return [h[key] for h in history if key in h]


def test_trainers_take_gradient_checkpointing(world_cache, tmp_path):
    """``train.gradient_checkpointing`` reaches the preference trainer (still prefix sharing,
    the same loss curve as without), SFT and the online policy role."""
    from alignlab.algorithms.policy_gradient.config import RLSection
    from alignlab.algorithms.policy_gradient.run import train_policy_gradient
    from alignlab.algorithms.preference.trainer import (
        PreferenceConfig,
        PreferenceSection,
        run_preference,
    )
    from alignlab.algorithms.sft import SFTConfig, run_sft
    from alignlab.core.config import DataSection, TrainSection, WorldSection

    from tests.conftest import online_config

    def dpo(out, on):
        return run_preference(PreferenceConfig(
            data=DataSection(source="world:positive", limit=32, max_length=96),
            train=TrainSection(output_dir=str(out), max_steps=3, batch_size=8, lr=2e-4, log_every=1,
                               progress=False, tensorboard=False, precision="fp32",
                               gradient_checkpointing=on),
            world=WorldSection(preset="tiny", cache_dir=world_cache),
            preference=PreferenceSection(loss="dpo")))

    plain, checkpointed = dpo(tmp_path / "a", False), dpo(tmp_path / "b", True)
    assert checkpointed.layout == "shared" and checkpointing_enabled(checkpointed.model)
    assert _losses(checkpointed.result.history) == pytest.approx(_losses(plain.result.history), abs=1e-5)

    sft = run_sft(SFTConfig(
        data=DataSection(source="world:positive", limit=16, max_length=64),
        train=TrainSection(output_dir=str(tmp_path / "sft"), max_steps=2, batch_size=8, log_every=1,
                           progress=False, tensorboard=False, gradient_checkpointing=True),
        world=WorldSection(preset="tiny", cache_dir=world_cache)))
    assert checkpointing_enabled(sft.model) and len(_losses(sft.result.history)) == 2

    cfg = online_config(world_cache, tmp_path / "grpo", RLSection(), steps=2)
    cfg.train.gradient_checkpointing = True
    run = train_policy_gradient(cfg, "grpo")
    assert len(run.result.history) == 2 and checkpointing_enabled(run.model)
