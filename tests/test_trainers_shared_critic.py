"""PPO with a value head on the policy's backbone (``rl.critic: shared``)."""

from __future__ import annotations

import pytest
import torch

from alignlab.algorithms.policy_gradient.config import NLPORLSection, PPORLSection
from alignlab.algorithms.policy_gradient.run import train_policy_gradient
from alignlab.algorithms.policy_gradient.shared_critic import value_head_for
from alignlab.core.errors import ConfigError
from alignlab.eval.evaluate import evaluate
from alignlab.models.logprobs import logprobs_and_values, token_logprobs

from tests.conftest import online_config, random_llama
from tests.test_models_shared_tokens import _rl_batch
from tests.test_trainers_ppo import EVAL


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_one_forward_gives_token_logprobs_and_the_heads_values(prefix_sharing, monkeypatch):
    import alignlab.models.fast_path as fast_path_module

    monkeypatch.setattr(fast_path_module, "MIN_SKIPPED_TOKENS", 0)  # share even this small batch
    batch = _rl_batch(seed=6)
    model = random_llama(seed=3).float()
    head = value_head_for(model, torch.device("cpu"))
    torch.nn.init.normal_(head.weight)
    lp, values, ent = logprobs_and_values(model, head, batch, temperature=0.8, with_entropy=True,
                                          prefix_sharing=prefix_sharing)
    want_lp, want_ent = token_logprobs(model, batch, temperature=0.8, return_entropy=True)
    assert torch.allclose(lp, want_lp, atol=1e-5) and torch.allclose(ent, want_ent, atol=1e-5)
    with torch.no_grad():  # V(s_t) from the hidden state at t - 1, on completion tokens only
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"]).last_hidden_state
        shifted = torch.zeros_like(values)
        shifted[:, 1:] = head(hidden[:, :-1]).squeeze(-1)
    want_v = torch.where(batch["loss_mask"].bool(), shifted, torch.zeros_like(shifted))
    assert torch.allclose(values, want_v, atol=1e-5) and values.abs().max() > 1e-3
    values.sum().backward()
    assert head.weight.grad.abs().sum() > 0 and model.model.embed_tokens.weight.grad is not None


def test_shared_critic_ppo_learns_fits_values_and_checkpoints_the_head(tiny_world, world_cache,
                                                                      tmp_path):
    # Seed 0, as the separate-critic test; the head alone needs a higher lr than the policy's
    # (measured: gain +0.62, value loss 0.069 → 0.024; seeds 1, 2: +0.61 / +0.73).
    cfg = online_config(world_cache, tmp_path, PPORLSection(
        epochs=2, minibatch_size=16, critic="shared", critic_lr=1e-2), steps=10)
    cfg.train.save_every = 10
    before = 0.057  # the tiny base's gold on these eval samples (test_trainers_ppo.gold_before)
    run = train_policy_gradient(cfg, "ppo")
    after = evaluate(run.model, run.tokenizer, tiny_world.task("positive"), EVAL)["metrics"]["gold_mean"]
    assert after > before + 0.4, after
    history = run.result.history
    assert "critic_loss" not in history[-1] and history[-1]["optimizer_steps"] == 4
    assert history[-1]["value_loss"] < 0.7 * history[0]["value_loss"]
    state = torch.load(tmp_path / "checkpoints" / "step-0000010" / "trainer_state.pt",
                       weights_only=True)["algorithm"]["critic"]
    assert state["value_head"]["weight"].abs().sum() > 0


def test_shared_critic_is_refused_for_nlpo(world_cache, tmp_path):
    cfg = online_config(world_cache, tmp_path, NLPORLSection(critic="shared"), steps=1)
    with pytest.raises(ConfigError, match="rl.critic"):
        train_policy_gradient(cfg, "nlpo")


def test_shared_critic_resumes_exactly(world_cache, tmp_path):
    """4 iterations in one go and 2 + 2 resumed end with the same policy and value head."""
    def cfg(out, steps):
        c = online_config(world_cache, out, PPORLSection(epochs=2, minibatch_size=16,
                                                          critic="shared", critic_lr=1e-2), steps)
        c.train.save_every = 2
        return c

    full = train_policy_gradient(cfg(tmp_path / "a", 4), "ppo")
    part = cfg(tmp_path / "b", 2)
    train_policy_gradient(part, "ppo")
    part.train.max_steps, part.train.resume = 4, True
    resumed = train_policy_gradient(part, "ppo")
    for a, b in zip(full.result.history[2:], resumed.result.history):
        assert a["value_loss"] == pytest.approx(b["value_loss"], rel=1e-5, abs=1e-7)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    a, b = (torch.load(tmp_path / d / "checkpoints" / "step-0000004" / "trainer_state.pt",
                       weights_only=True)["algorithm"]["critic"]["value_head"] for d in ("a", "b"))
    torch.testing.assert_close(a["weight"], b["weight"])
