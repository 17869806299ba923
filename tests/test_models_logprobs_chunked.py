"""The chunked log-prob computation against a plain full-vocabulary reference: values, entropy
and every gradient, in uneven chunks, with and without bias and temperature; then
``token_logprobs``/``sequence_logprobs`` on padded and packed batches of a tiny decoder.
Fast (no world, one two-layer model): these are the tests ``tools/mutate.py`` runs for
``models/logprobs.py``."""

from __future__ import annotations

import pytest
import torch

from alignlab.core.errors import ConfigError
from alignlab.models.backbone import (
    _compute_dtype,
    chunked_logprobs,
    decoder_hidden,
    scored_positions,
)
from alignlab.models.logprobs import sequence_logprobs, token_logprobs

from tests.conftest import random_llama


def _reference(hidden, weight, bias, targets, temperature):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    logz = torch.log_softmax(z / temperature, dim=-1)
    return logz.gather(-1, targets[:, None]).squeeze(-1), -(logz.exp() * logz).sum(-1)


def _leaves(seed, with_bias=True, n=7, h=4, v=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, bias, targets


def _grads(tensors):
    out = [None if t is None else t.grad.clone() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("terms", ["both", "logp", "entropy"])
def test_chunked_values_and_gradients_match_the_full_softmax(temperature, with_bias, terms):
    hidden, weight, bias, targets = _leaves(1, with_bias)
    leaves = [hidden, weight, bias]
    g = torch.Generator().manual_seed(2)
    w_lp, w_ent = torch.randn(7, generator=g), torch.randn(7, generator=g)

    def objective(lp, ent):
        total = 0
        if terms in ("both", "logp"):
            total = total + (w_lp * lp).sum()
        if terms in ("both", "entropy"):
            total = total + (w_ent * ent).sum()
        return total

    lp, ent = chunked_logprobs(hidden, weight, bias, targets, temperature=temperature,
                               chunk_size=3, with_entropy=True)
    ref_lp, ref_ent = _reference(hidden, weight, bias, targets, temperature)
    torch.testing.assert_close(lp, ref_lp.float())
    torch.testing.assert_close(ent, ref_ent.float())
    objective(lp, ent).backward()
    got = _grads(leaves)
    objective(ref_lp, ref_ent).backward()
    want = _grads(leaves)
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_without_entropy_the_entropy_is_empty_and_only_needed_grads_are_computed():
    hidden, weight, bias, targets = _leaves(3)
    weight.requires_grad_(False)
    lp, ent = chunked_logprobs(hidden, weight, bias, targets, chunk_size=4)
    assert ent.numel() == 0
    lp.sum().backward()
    assert weight.grad is None and hidden.grad is not None and bias.grad is not None
    ref_lp, _ = _reference(hidden, weight, bias, targets, 1.0)
    torch.testing.assert_close(lp, ref_lp.float())


def test_compute_dtype_follows_autocast_else_the_promoted_input_dtype():
    h, w = torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.float64)
    assert _compute_dtype(h, w) == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _compute_dtype(h, w) == torch.bfloat16


# ---- token_logprobs / sequence_logprobs on a tiny decoder -------------------------------------

def _padded():
    ids = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 10, 0, 0]])
    return {"input_ids": ids, "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
            "position_ids": torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]),
            "loss_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])}


def _full_reference(model, batch, temperature=1.0):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids")).logits.double()
    logz = torch.log_softmax(logits[:, :-1] / temperature, -1)
    lp = logz.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    ent = -(logz.exp() * logz).sum(-1)
    mask = batch["loss_mask"][:, 1:].bool()
    out_lp = torch.zeros(batch["input_ids"].shape, dtype=torch.float64)
    out_ent = torch.zeros_like(out_lp)
    out_lp[:, 1:] = torch.where(mask, lp, 0.0)
    out_ent[:, 1:] = torch.where(mask, ent, 0.0)
    return out_lp, out_ent


@pytest.mark.parametrize("chunked", [None, False])
def test_token_logprobs_and_entropy_match_the_full_logits(chunked):
    model = random_llama().eval()
    batch = _padded()
    lp, ent = token_logprobs(model, batch, temperature=1.5, chunk_size=2, chunked=chunked,
                             return_entropy=True)
    ref_lp, ref_ent = _full_reference(model, batch, 1.5)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    assert (lp[batch["loss_mask"] == 0] == 0).all() and lp.shape == batch["input_ids"].shape
    plain = token_logprobs(model, batch, chunked=chunked)
    torch.testing.assert_close(plain.double(), _full_reference(model, batch)[0], rtol=1e-5,
                               atol=1e-5)


def test_packed_sequences_restart_at_position_zero_and_sum_per_sequence():
    model = random_llama().eval()
    # two sequences packed in one row: (5, 6, 7) and (8, 9); every token is in loss_mask
    packed = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "attention_mask": None,
              "position_ids": torch.tensor([[0, 1, 2, 0, 1]]), "seq_lens": [3, 2],
              "loss_mask": torch.tensor([[1, 1, 1, 1, 1]])}
    lp = token_logprobs(model, packed)
    assert lp[0, 0] == 0 and lp[0, 3] == 0  # a sequence's first token has no context
    first = token_logprobs(model, {"input_ids": torch.tensor([[5, 6, 7]]),
                                   "loss_mask": torch.tensor([[1, 1, 1]])})
    second = token_logprobs(model, {"input_ids": torch.tensor([[8, 9]]),
                                    "loss_mask": torch.tensor([[1, 1]])})
    torch.testing.assert_close(lp[0, :3], first[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp[0, 3:], second[0], rtol=1e-5, atol=1e-5)
    sums = sequence_logprobs(lp, packed)
    torch.testing.assert_close(sums, torch.stack([first.sum(), second.sum()]))
    means = sequence_logprobs(lp, packed, reduce="mean")
    # mean over loss_mask tokens (3 and 2 here, the unscored first tokens count as 0)
    torch.testing.assert_close(means, torch.stack([first.sum() / 3, second.sum() / 2]))
    with pytest.raises(ConfigError, match="seq_lens sum to 4"):
        sequence_logprobs(lp, {**packed, "seq_lens": [3, 1]})


def test_sequence_logprobs_of_padded_rows():
    lp = torch.tensor([[0.0, -1.0, -2.0, 9.0], [0.0, -3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    batch = {"input_ids": torch.zeros(3, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4),
             "loss_mask": torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])}
    torch.testing.assert_close(sequence_logprobs(lp, batch), torch.tensor([-3.0, -3.0, 0.0]))
    torch.testing.assert_close(sequence_logprobs(lp, batch, "mean"), torch.tensor([-1.5, -3.0, 0.0]))
    with pytest.raises(ConfigError, match="reduce must be"):
        sequence_logprobs(lp, batch, "max")


def test_scored_hidden_states_are_the_rows_before_each_scored_token():
    model = random_llama().eval()
    batch = _padded()
    where = scored_positions(batch)
    hidden = decoder_hidden(model.model, batch)[:, :-1][where]
    targets = batch["input_ids"][:, 1:][where]
    assert targets.tolist() == [7, 8, 9, 4, 10]
    full = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).last_hidden_state
    torch.testing.assert_close(hidden, torch.stack([full[0, 1], full[0, 2], full[0, 3],
                                                    full[1, 0], full[1, 1]]))


def test_bad_arguments_are_config_errors():
    model = random_llama()
    batch = _padded()
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        token_logprobs(model, batch, temperature=0.0)
    with pytest.raises(ConfigError, match="chunk_size must be >= 1"):
        token_logprobs(model, batch, chunk_size=0)
    with pytest.raises(ConfigError, match="has no 'loss_mask'"):
        token_logprobs(model, {"input_ids": batch["input_ids"]})
    with pytest.raises(ConfigError, match="loss_mask shape"):
        token_logprobs(model, {**batch, "loss_mask": batch["loss_mask"][:, :3]})
    assert token_logprobs(model, batch, chunk_size=1).shape == (2, 5)


def test_chunked_true_takes_the_chunked_path_when_it_is_exact():
    model = random_llama().eval()
    batch = _padded()
    got = token_logprobs(model, batch, chunked=True)
    torch.testing.assert_close(got.double(), _full_reference(model, batch)[0], rtol=1e-5, atol=1e-5)


def test_float32_gradients_are_computed_in_float32():
    hidden, weight, bias, targets = _leaves(4)
    leaves = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    lp, _ = chunked_logprobs(*leaves, targets, chunk_size=3)
    lp.sum().backward()
    got = _grads(leaves)
    ref, _ = _reference(*leaves, targets, 1.0)
    ref.sum().backward()
    for a, b in zip(got, _grads(leaves)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_true_refuses_a_model_that_post_processes_its_logits():
    model = random_llama().eval()
    model.config.final_logit_softcapping = 30.0  # the head's output is then not the logits
    with pytest.raises(ConfigError, match="chunked=True"):
        token_logprobs(model, _padded(), chunked=True)


def test_chunked_false_never_asks_for_a_fast_path(monkeypatch):
    from alignlab.models import logprobs

    asked, real_route = [], logprobs.route

    def spy(model, batch, prefix_sharing):
        asked.append(prefix_sharing)
        return real_route(model, batch, prefix_sharing)

    monkeypatch.setattr(logprobs, "route", spy)  # patched where token_logprobs reads it
    model, batch = random_llama().eval(), _padded()
    token_logprobs(model, batch, chunked=False)
    assert asked == []  # the full-logits forward, whatever the batch
    token_logprobs(model, batch, prefix_sharing=True)
    token_logprobs(model, batch, chunked=True)
    assert asked == [True, False]


def test_sequence_logprobs_without_attention_mask_or_seq_lens_is_one_per_row():
    lp = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, 0.0]])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long),
             "loss_mask": torch.tensor([[0, 1, 1], [0, 1, 0]])}
    torch.testing.assert_close(sequence_logprobs(lp, batch), torch.tensor([-3.0, -0.5]))
    # with an attention mask, seq_lens (if any) are ignored: the rows are padded, not packed
    padded = {**batch, "attention_mask": torch.ones(2, 3), "seq_lens": [4, 2]}
    torch.testing.assert_close(sequence_logprobs(lp, padded), torch.tensor([-3.0, -0.5]))


def test_the_chunk_size_reaches_the_projection(monkeypatch):
    # chunk_size bounds memory, not values, so only the call can show that it is honoured
    from alignlab.models import logprobs

    sizes, real = [], logprobs.chunked_logprobs

    def spy(*args, chunk_size, **kwargs):
        sizes.append(chunk_size)
        return real(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(logprobs, "chunked_logprobs", spy)
    model, batch = random_llama().eval(), _padded()
    token_logprobs(model, batch, chunk_size=3)
    assert sizes == [3]
