"""Per-token log-probs of flat RL batches by prefix sharing equal ``token_logprobs``."""

from __future__ import annotations

import functools

import pytest
import torch

from alignlab.data.collate import completion_rows
from alignlab.models.logprobs import token_logprobs
from alignlab.models.shared_tokens import as_groups, grouped_token_logprobs, shared_token_logprobs
from tests.conftest import random_llama


def _rl_batch(seed: int = 0, groups: int = 3, n: int = 4) -> dict[str, torch.Tensor]:
    """Rows prompt + completion, each prompt ``n`` times (GRPO's groups), right-padded, with
    position ids and the loss mask on the completions, as ``RolloutRole.to_batch`` builds them."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    rows, starts = [], []
    for _ in range(groups):
        prompt = torch.randint(1, 64, (rand(2, 9),), generator=g).tolist()
        for _ in range(n):
            rows.append(prompt + torch.randint(1, 64, (rand(1, 12),), generator=g).tolist())
            starts.append(len(prompt))
    return completion_rows(rows, starts, 0)


def test_grouping_dedupes_prompts():
    batch = _rl_batch()
    groups = as_groups(batch)
    assert groups["prompt_ids"].shape[0] == 3 and groups["owner"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert groups["completion_lengths"].tolist() == batch["loss_mask"].sum(1).tolist()
    bad = dict(batch, loss_mask=batch["loss_mask"].clone())
    row = int(torch.nonzero(batch["loss_mask"].sum(1) >= 3)[0])
    bad["loss_mask"][row, int(batch["attention_mask"][row].sum()) - 2] = 0  # a hole in the block
    assert as_groups(bad) is None and as_groups({"input_ids": batch["input_ids"]}) is None


def test_values_entropy_and_gradients_equal_token_logprobs():
    batch = _rl_batch(seed=1)
    model = random_llama(seed=2).float()
    grads = []
    shared = functools.partial(shared_token_logprobs, min_skipped_tokens=0)
    for fn in (token_logprobs, shared):
        model.zero_grad()
        lp, ent = fn(model, batch, temperature=0.7, return_entropy=True)
        ((lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum() + ent.sum()).backward()
        grads.append((lp.detach(), ent.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (lp0, e0, g0), (lp1, e1, g1) = grads
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(e0, e1, atol=1e-5)
    assert torch.allclose(g0, g1, atol=1e-5) and g0.abs().max() > 1e-3
    assert (lp1[batch["loss_mask"] == 0] == 0).all()


def test_falls_back_where_sharing_does_not_apply():
    batch = _rl_batch(seed=3)
    model = random_llama(seed=2).float()
    model.set_attn_implementation("eager")
    assert shared_token_logprobs(model, batch, min_skipped_tokens=0) is None
    assert torch.allclose(grouped_token_logprobs(model, batch), token_logprobs(model, batch))
    model.set_attn_implementation("sdpa")
    assert shared_token_logprobs(model, batch, min_skipped_tokens=0) is not None
    assert shared_token_logprobs(model, batch, min_skipped_tokens=batch["input_ids"].numel()) is None


def test_critic_values_by_prefix_sharing_equal_the_shifted_flat_values():
    from alignlab.models.heads import CausalLMWithScalarHead
    from alignlab.models.shared_tokens import shared_state_values
    from alignlab.algorithms.policy_gradient.critic import state_values

    batch = _rl_batch(seed=4)
    critic = CausalLMWithScalarHead(random_llama(seed=5).float())
    out = []
    for shared in (False, True):
        critic.zero_grad()
        v = (shared_state_values(critic, batch, min_skipped_tokens=0) if shared
             else state_values(critic, batch, prefix_sharing=False))
        (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
        out.append((v.detach(), torch.cat([p.grad.flatten() for p in critic.parameters()])))
    (v0, g0), (v1, g1) = out
    assert torch.allclose(v0, v1, atol=1e-5) and torch.allclose(g0, g1, atol=1e-5)
    assert v0.abs().max() > 1e-3 and (v1[batch["loss_mask"] == 0] == 0).all()


@pytest.mark.parametrize("heads", [1, 2])
def test_reward_model_sequence_values_by_prefix_sharing(heads):
    """A reward model's value at each sequence's end (pairs sharing their prompt) equals the
    plain forward's, values and gradients, one head or an ensemble of heads."""
    from alignlab.data.collate import preference_collate
    from alignlab.models.heads import CausalLMWithScalarHead, sequence_end_values
    from alignlab.models.shared_tokens import shared_sequence_values
    from tests.test_models_prefix_sharing import _examples

    model = CausalLMWithScalarHead(random_llama(seed=7).float(), num_heads=heads)
    batch = preference_collate(_examples("paired"), 0)
    out = []
    for shared in (False, True):
        model.zero_grad()
        v = (shared_sequence_values(model, batch, min_skipped_tokens=0) if shared
             else sequence_end_values(model(batch), batch))
        (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
        out.append((v.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (v0, g0), (v1, g1) = out
    assert v0.shape == v1.shape == ((10,) if heads == 1 else (10, 2))
    assert torch.allclose(v0, v1, atol=1e-5) and torch.allclose(g0, g1, atol=1e-5)
