"""Chunked per-token log-probs equal the naive full log-softmax, in values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignlab.core.errors import ConfigError
from alignlab.models.backbone import chunked_logprobs, find_backbone_and_head
from alignlab.models.logprobs import sequence_logprobs, token_logprobs

VOCAB = 97


def tiny_llama(tied: bool, seed: int = 0, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tied, **extra)
    model = LlamaForCausalLM(config).float()
    model.train()
    return model


def padded_batch(seqs: list[list[int]], prompt_lens: list[int]) -> dict:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        loss[i, p:len(s)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "loss_mask": loss}


def packed_batch(seqs: list[list[int]], prompt_lens: list[int]) -> dict:
    ids = torch.tensor([sum(seqs, [])])
    pos = torch.tensor([[i for s in seqs for i in range(len(s))]])
    loss = torch.tensor([[int(i >= max(p, 1)) for s, p in zip(seqs, prompt_lens)
                          for i in range(len(s))]])
    return {"input_ids": ids, "attention_mask": None, "position_ids": pos, "loss_mask": loss,
            "seq_lens": [len(s) for s in seqs]}


def naive_logprobs(model, batch, temperature=1.0) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    out = torch.zeros(batch["input_ids"].shape)
    out[:, 1:] = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return out * batch["loss_mask"]


def random_seqs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lens, prompts = [11, 7, 14], [4, 1, 6]
    seqs = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lens]
    return seqs, prompts


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_naive_values_and_grads(tied, temperature):
    model = tiny_llama(tied)
    if not tied:  # exercise the bias path too
        model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 0.1)
    batch = padded_batch(*random_seqs())
    assert find_backbone_and_head(model) is not None
    n_scored = int(batch["loss_mask"][:, 1:].sum())
    weights = torch.randn(batch["input_ids"].shape)

    model.zero_grad()
    lp = token_logprobs(model, batch, temperature=temperature, chunk_size=5)
    assert 5 < n_scored and lp.shape == batch["input_ids"].shape and lp.dtype == torch.float32
    (lp * weights).sum().backward()
    chunked_grads = grads(model)

    model.zero_grad()
    ref = naive_logprobs(model, batch, temperature)
    (ref * weights).sum().backward()
    ref_grads = grads(model)

    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    assert set(chunked_grads) == set(ref_grads)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, g in ref_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_masked_positions_are_exactly_zero():
    model = tiny_llama(True)
    batch = padded_batch(*random_seqs())
    batch["loss_mask"][:, 0] = 1  # t=0 has no context: still 0
    lp = token_logprobs(model, batch, chunk_size=4)
    assert torch.all(lp[:, 0] == 0)
    off = batch["loss_mask"] == 0
    assert torch.all(lp[off] == 0)
    assert torch.all(lp[:, 1:][batch["loss_mask"][:, 1:].bool()] < 0)


def test_packed_equals_padded_and_sequence_sums():
    model = tiny_llama(False)
    seqs, prompts = random_seqs()
    padded, packed = padded_batch(seqs, prompts), packed_batch(seqs, prompts)
    lp_pad = token_logprobs(model, padded, chunk_size=3)
    lp_pack = token_logprobs(model, packed, chunk_size=3)
    flat_pad = torch.cat([lp_pad[i, :len(s)] for i, s in enumerate(seqs)])
    torch.testing.assert_close(lp_pack[0], flat_pad, atol=1e-5, rtol=1e-5)

    for reduce in ("sum", "mean"):
        a = sequence_logprobs(lp_pad, padded, reduce=reduce)
        b = sequence_logprobs(lp_pack, packed, reduce=reduce)
        assert a.shape == b.shape == (3,)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    counts = padded["loss_mask"].sum(-1).float()
    torch.testing.assert_close(sequence_logprobs(lp_pad, padded, "mean"),
                               lp_pad.sum(-1) / counts)


def test_packed_sequence_start_never_scores_previous_sequence():
    model = tiny_llama(True)
    seqs, prompts = random_seqs()
    batch = packed_batch(seqs, prompts)
    batch["loss_mask"] = torch.ones_like(batch["loss_mask"])  # a sloppy collator
    lp = token_logprobs(model, batch)
    starts = torch.tensor([0, len(seqs[0]), len(seqs[0]) + len(seqs[1])])
    assert torch.all(lp[0, starts] == 0)


def test_fallback_equals_chunked_and_entropy():
    model = tiny_llama(False)
    batch = padded_batch(*random_seqs())
    lp_c, ent_c = token_logprobs(model, batch, chunk_size=4, return_entropy=True,
                                 temperature=0.8)
    lp_f, ent_f = token_logprobs(model, batch, chunked=False, return_entropy=True,
                                 temperature=0.8)
    torch.testing.assert_close(lp_c, lp_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_c, ent_f, atol=1e-5, rtol=1e-5)
    assert torch.all(ent_c[batch["loss_mask"] == 0] == 0)
    assert torch.all(ent_c[:, 1:][batch["loss_mask"][:, 1:].bool()] > 0)

    # The entropy gradient (for entropy bonuses) matches autograd through the full softmax.
    model.zero_grad()
    ent_c.sum().backward()
    g_c = grads(model)
    model.zero_grad()
    token_logprobs(model, batch, chunked=False, return_entropy=True,
                   temperature=0.8)[1].sum().backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(g_c[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_logit_postprocessing_selects_fallback():
    model = tiny_llama(True)
    model.config.final_logit_softcapping = 30.0
    assert find_backbone_and_head(model) is None
    with pytest.raises(ConfigError, match="post-processes"):
        token_logprobs(model, padded_batch(*random_seqs()), chunked=True)


def test_lora_model_chunked_and_only_lora_grads():
    peft = pytest.importorskip("peft")
    model = tiny_llama(True)
    batch = padded_batch(*random_seqs())
    base_lp = token_logprobs(model, batch).detach()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules="all-linear"))
    parts = find_backbone_and_head(lora)
    assert parts is not None
    # LoRA B starts at zero: same log-probs as the base model.
    lp = token_logprobs(lora, batch, chunk_size=4)
    torch.testing.assert_close(lp, base_lp, atol=1e-6, rtol=1e-6)
    lp.sum().backward()
    with_grad = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert not any(p.grad is not None for n, p in lora.named_parameters() if "lora_" not in n)
    # The adapter moves the log-probs once B is non-zero, and both paths still agree.
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    torch.testing.assert_close(token_logprobs(lora, batch, chunk_size=4),
                               token_logprobs(lora, batch, chunked=False), atol=1e-5, rtol=1e-5)


def test_chunked_function_under_bf16_autocast_is_close_to_float32():
    torch.manual_seed(0)
    hidden = torch.randn(13, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    ref = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = chunked_logprobs(hidden, weight, None, targets, chunk_size=4)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref, atol=0.3, rtol=0.05)
    lp.sum().backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_model_under_autocast_runs():
    model = tiny_llama(False)
    batch = padded_batch(*random_seqs())
    ref = token_logprobs(model, batch).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = token_logprobs(model, batch, chunk_size=4)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref, atol=0.2, rtol=0.05)
    lp.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_no_scored_tokens_and_bad_arguments():
    model = tiny_llama(True)
    batch = padded_batch(*random_seqs())
    batch["loss_mask"].zero_()
    lp = token_logprobs(model, batch)
    assert torch.all(lp == 0)
    assert torch.all(sequence_logprobs(lp, batch, "mean") == 0)
    with pytest.raises(ConfigError):
        token_logprobs(model, batch, temperature=0)
    with pytest.raises(ConfigError):
        sequence_logprobs(lp, batch, reduce="max")


def test_restricted_logprobs_with_everything_allowed_equal_token_logprobs_and_renormalise():
    from alignlab.models.logprobs import next_token_logits, restricted_token_logprobs

    model = tiny_llama(tied=True)
    batch = padded_batch(*random_seqs())
    logits, targets, scored = next_token_logits(model, batch)
    assert logits.shape == (int(scored.sum()), VOCAB) and targets.shape == (logits.shape[0],)
    everything = torch.ones_like(logits, dtype=torch.bool)
    lp, ent = restricted_token_logprobs(model, batch, everything, temperature=0.7,
                                        return_entropy=True)
    ref_lp, ref_ent = token_logprobs(model, batch, temperature=0.7, return_entropy=True)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    # only the target and one other token allowed: log p = z_y − logsumexp(z_y, z_o)
    allowed = torch.zeros_like(everything)
    rows = torch.arange(len(targets))
    other = (targets + 1) % VOCAB
    allowed[rows, targets] = allowed[rows, other] = True
    lp2, ent2 = restricted_token_logprobs(model, batch, allowed, return_entropy=True)
    z = logits.detach()
    expected = z[rows, targets] - torch.logaddexp(z[rows, targets], z[rows, other])
    torch.testing.assert_close(lp2[:, 1:][scored], expected, atol=1e-5, rtol=0)
    assert (ent2 <= torch.log(torch.tensor(2.0)) + 1e-5).all()
    lp2.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ConfigError, match="allowed has shape"):
        restricted_token_logprobs(model, batch, allowed[:-1])
