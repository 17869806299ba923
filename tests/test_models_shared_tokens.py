"""Per-token log-probs and values of flat RL batches by prefix sharing equal the plain path's."""

from __future__ import annotations

import pytest
import torch

import alignlab.models._fast.shared_tokens as shared_tokens
import alignlab.models.fast_path as fast_path_module
from alignlab.data.collate import completion_rows
from alignlab.models._fast.shared_tokens import as_groups
from alignlab.models.logprobs import fast_path, token_logprobs

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


@pytest.fixture
def share_small_batches(monkeypatch):
    """Share even these small test batches (they skip far fewer than MIN_SKIPPED_TOKENS)."""
    monkeypatch.setattr(fast_path_module, "MIN_SKIPPED_TOKENS", 0)


def _spy(monkeypatch, module, name):
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))
    return calls


def test_grouping_dedupes_prompts():
    batch = _rl_batch()
    groups = as_groups(batch)
    assert groups["prompt_ids"].shape[0] == 3 and groups["owner"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert groups["completion_lengths"].tolist() == batch["loss_mask"].sum(1).tolist()
    bad = dict(batch, loss_mask=batch["loss_mask"].clone())
    row = int(torch.nonzero(batch["loss_mask"].sum(1) >= 3)[0])
    bad["loss_mask"][row, int(batch["attention_mask"][row].sum()) - 2] = 0  # a hole in the block
    assert as_groups(bad) is None and as_groups({"input_ids": batch["input_ids"]}) is None


def test_values_entropy_and_gradients_equal_token_logprobs(share_small_batches, monkeypatch):
    batch = _rl_batch(seed=1)
    model = random_llama(seed=2).float()
    calls = _spy(monkeypatch, shared_tokens, "group_token_logprobs")
    grads = []
    for sharing in (False, True):
        model.zero_grad()
        lp, ent = token_logprobs(model, batch, temperature=0.7, return_entropy=True,
                                 prefix_sharing=sharing)
        ((lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum() + ent.sum()).backward()
        grads.append((lp.detach(), ent.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert calls == ["group_token_logprobs"]  # the plain path, then the shared one
    (lp0, e0, g0), (lp1, e1, g1) = grads
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(e0, e1, atol=1e-5)
    assert torch.allclose(g0, g1, atol=1e-5) and g0.abs().max() > 1e-3
    assert (lp1[batch["loss_mask"] == 0] == 0).all()


def test_falls_back_where_sharing_does_not_apply(monkeypatch):
    """The decision: sharing where the model and the batch allow it, plain elsewhere, each with
    its reason; and the shared values equal the plain path's (not the same path twice)."""
    batch = _rl_batch(seed=3)
    model = random_llama(seed=2).float()
    plain = token_logprobs(model, batch)  # prefix_sharing off: the plain path
    assert fast_path(model, batch).name == "plain"
    assert "skip only" in fast_path(model, batch, prefix_sharing=True).reason  # too small to pay
    monkeypatch.setattr(fast_path_module, "MIN_SKIPPED_TOKENS", 0)
    assert fast_path(model, batch, prefix_sharing=True).name == "group_pass"
    assert torch.allclose(token_logprobs(model, batch, prefix_sharing=True), plain, atol=1e-5)
    model.set_attn_implementation("eager")
    path = fast_path(model, batch, prefix_sharing=True)
    assert path.name == "plain" and "SDPA" in path.reason
    calls = _spy(monkeypatch, shared_tokens, "group_token_logprobs")
    assert torch.allclose(token_logprobs(model, batch, prefix_sharing=True), plain, atol=1e-5)
    assert not calls


def test_critic_values_by_prefix_sharing_equal_the_shifted_flat_values(share_small_batches):
    from alignlab.models.heads import CausalLMWithScalarHead
    from alignlab.models.logprobs import state_values

    batch = _rl_batch(seed=4)
    critic = CausalLMWithScalarHead(random_llama(seed=5).float())
    assert fast_path(critic, batch, prefix_sharing=True).name == "group_pass"
    out = []
    for sharing in (False, True):
        critic.zero_grad()
        v = state_values(critic, batch, prefix_sharing=sharing)
        (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
        out.append((v.detach(), torch.cat([p.grad.flatten() for p in critic.parameters()])))
    (v0, g0), (v1, g1) = out
    assert torch.allclose(v0, v1, atol=1e-5) and torch.allclose(g0, g1, atol=1e-5)
    assert v0.abs().max() > 1e-3 and (v1[batch["loss_mask"] == 0] == 0).all()


@pytest.mark.parametrize("heads", [1, 2])
def test_reward_model_sequence_values_by_prefix_sharing(heads, share_small_batches):
    """A reward model's value at each sequence's end (pairs sharing their prompt) equals the
    plain forward's, values and gradients, one head or an ensemble of heads."""
    from alignlab.data.collate import preference_collate
    from alignlab.models.backbone import sequence_end_values
    from alignlab.models.heads import CausalLMWithScalarHead
    from alignlab.models.logprobs import sequence_values

    from tests.test_models_prefix_sharing import _examples

    model = CausalLMWithScalarHead(random_llama(seed=7).float(), num_heads=heads)
    batch = preference_collate(_examples("paired"), 0)
    assert fast_path(model, batch, prefix_sharing=True).name == "group_pass"
    out = []
    for shared in (False, True):
        model.zero_grad()
        v = sequence_values(model, batch) if shared else sequence_end_values(model(batch), batch)
        (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
        out.append((v.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (v0, g0), (v1, g1) = out
    assert v0.shape == v1.shape == ((10,) if heads == 1 else (10, 2))
    assert torch.allclose(v0, v1, atol=1e-5) and torch.allclose(g0, g1, atol=1e-5)
