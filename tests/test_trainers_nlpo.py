"""NLPO's action mask: refresh schedule, masked sampling, and the same π^M in rollout and loss."""

from __future__ import annotations

import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignlab.algorithms.policy_gradient.nlpo import ActionMask, MaskedPolicyObjective, top_p_set
from alignlab.algorithms.policy_gradient.objective import PolicyObjective
from alignlab.engine.loop import forward_backward
from alignlab.models.logprobs import next_token_logits
from alignlab.rollout.engine import SamplingParams, rollout

from conftest import random_llama

V = 64
PROMPTS = [[5, 9, 3], [7, 2, 11, 4, 8, 30], [21], [14, 6, 40, 2]]


def _peaky_llama(seed: int):
    # A larger init than the default: next-token distributions with a few likely tokens, so a
    # top-p set is much smaller than the vocabulary.
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=128,
                      initializer_range=0.3, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _sample(policy, mask: ActionMask, compact: bool = True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rollout(policy, PROMPTS, SamplingParams(max_new_tokens=12, n=3, seed=4),
                       eos_token_id=7, pad_token_id=0, compact=compact,
                       logits_processor=mask.processor())


def test_mask_policy_is_refreshed_every_update_every_iterations():
    policy = random_llama(vocab_size=V)
    mask = ActionMask(policy, top_p=0.9, update_every=3)
    refreshed = []
    for it in range(8):
        with torch.no_grad():
            policy.lm_head.weight.add_(0.1)  # the policy moves every iteration
        if mask.maybe_refresh(policy, it):
            refreshed.append(it)
            torch.testing.assert_close(mask.model.lm_head.weight, policy.lm_head.weight)
        else:
            assert not torch.equal(mask.model.lm_head.weight, policy.lm_head.weight)
    assert refreshed == [3, 6] and mask.refreshes == 2
    assert not any(p.requires_grad for p in mask.model.parameters())


def test_sampled_tokens_lie_in_the_mask_policys_top_p_set_and_loss_uses_the_same_distribution():
    policy, mask_model = _peaky_llama(0), _peaky_llama(1)  # the mask policy differs from π
    mask = ActionMask(mask_model, top_p=0.6, update_every=5)
    for compact in (True, False):
        rb = _sample(policy, mask, compact)
        batch = rb.padded()
        logits, targets, _ = next_token_logits(mask_model, batch)
        allowed = top_p_set(logits, 0.6)
        assert allowed[torch.arange(len(targets)), targets].all()
        assert allowed.sum(-1).float().mean() < V / 4  # the mask really restricts
    # π^M of the loss equals π^M of the rollout, token for token
    objective = MaskedPolicyObjective(mask, "ppo_clip", "token_mean")
    torch.testing.assert_close(objective.policy_logprobs(policy, batch), batch["old_logprobs"],
                               atol=1e-4, rtol=0)
    # unmasked, the sampled tokens would often have been outside the set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        free = rollout(policy, PROMPTS, SamplingParams(max_new_tokens=12, n=3, seed=4),
                       eos_token_id=7, pad_token_id=0).padded()
    logits, targets, _ = next_token_logits(mask_model, free)
    assert not top_p_set(logits, 0.6)[torch.arange(len(targets)), targets].all()


def test_nlpo_objective_with_top_p_one_is_the_ppo_objective():
    policy = random_llama(vocab_size=V)
    rb = _sample(policy, ActionMask(policy, top_p=1.0, update_every=5))
    batch = rb.padded()
    batch["advantages"] = torch.randn(batch["loss_mask"].shape) * batch["loss_mask"]
    grads = []
    for objective in (PolicyObjective("ppo_clip", "token_mean"),
                      MaskedPolicyObjective(ActionMask(policy, 1.0, 5), "ppo_clip", "token_mean")):
        policy.zero_grad()
        loss, _, _ = forward_backward(policy, objective, [batch], torch.device("cpu"))
        grads.append([p.grad.clone() for p in policy.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
