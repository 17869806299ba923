"""The rollout engine: greedy parity with ``generate``, log-probs, finish reasons, ordering, seeds."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignlab.models.logprobs import token_logprobs
from alignlab.rollout.engine import LENGTH_WARNING, SamplingParams, rollout

V = 48


@pytest.fixture(scope="module")
def model():
    # A larger init than the default so greedy outputs vary from token to token.
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=128,
                      initializer_range=0.3, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[5, 9, 3], [7, 2, 11, 4, 8, 30], [21], [14, 6, 40, 2]]


class CharTokenizer:
    """Token i decodes to one letter, so stop strings can be placed by hand."""

    eos_token_id, pad_token_id = None, 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def run(model, params, eos=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rollout(model, PROMPTS, params, eos_token_id=eos, pad_token_id=0, **kw)


def test_greedy_matches_generate_token_for_token(model):
    rb = run(model, SamplingParams(temperature=0, max_new_tokens=12))
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(width) >= width - torch.tensor([len(p) for p in PROMPTS])[:, None]).long()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                         pad_token_id=0, eos_token_id=None)
    assert rb.completion_ids == out[:, width:].tolist()
    assert len({tuple(c) for c in rb.completion_ids}) == len(PROMPTS)
    assert all(len(set(c)) > 2 for c in rb.completion_ids)  # not a constant sequence


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("compact", [True, False])
def test_logprobs_equal_teacher_forced_recomputation(model, temperature, compact):
    params = SamplingParams(temperature=temperature, top_k=10, top_p=0.9, max_new_tokens=10,
                            n=3, seed=1)
    rb = run(model, params, eos=7, compact=compact)
    batch = rb.padded()
    recomputed = token_logprobs(model, batch, temperature=temperature)
    assert batch["loss_mask"].sum() == rb.completion_mask.sum() > 0
    assert torch.allclose(recomputed, batch["old_logprobs"], atol=1e-4)
    assert torch.equal(batch["input_ids"][0, :3], torch.tensor(PROMPTS[0]))


def test_finish_reasons_eos_stop_id_length(model):
    greedy = run(model, SamplingParams(temperature=0, max_new_tokens=8)).completion_ids[1]
    target = greedy[3]
    first = greedy.index(target)
    by_eos = run(model, SamplingParams(temperature=0, max_new_tokens=8), eos=target)
    assert by_eos.completion_ids[1] == greedy[:first + 1] and by_eos.finish_reasons[1] == "eos"
    by_id = run(model, SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(target,)))
    assert by_id.completion_ids[1] == greedy[:first + 1] and by_id.finish_reasons[1] == "stop"
    plain = run(model, SamplingParams(temperature=0, max_new_tokens=8))
    assert plain.finish_reasons == ["length"] * 4 and all(len(c) == 8 for c in plain.completion_ids)


def test_stop_string_on_decoded_tail(model):
    tok = CharTokenizer()
    greedy = run(model, SamplingParams(temperature=0, max_new_tokens=10), tokenizer=tok)
    text = greedy.texts[0]
    stop = text[3:5]
    cut = text.find(stop)
    rb = run(model, SamplingParams(temperature=0, max_new_tokens=10, stop=(stop,)), tokenizer=tok)
    assert rb.finish_reasons[0] == "stop"
    assert rb.completion_ids[0] == greedy.completion_ids[0][:cut + 2]  # through the stop's last token
    assert rb.texts[0] == text[:cut]


def test_n_samples_per_prompt_are_grouped_in_order(model):
    rb = run(model, SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=0))
    assert rb.prompt_ids == [p for p in PROMPTS for _ in range(3)]
    assert rb.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    greedy = run(model, SamplingParams(temperature=0, max_new_tokens=6, n=2))
    single = run(model, SamplingParams(temperature=0, max_new_tokens=6))
    assert greedy.completion_ids == [c for c in single.completion_ids for _ in range(2)]


def test_same_seed_same_samples(model):
    a = run(model, SamplingParams(max_new_tokens=8, n=2, seed=5))
    b = run(model, SamplingParams(max_new_tokens=8, n=2, seed=5))
    c = run(model, SamplingParams(max_new_tokens=8, n=2, seed=6))
    assert a.completion_ids == b.completion_ids and torch.equal(a.logprobs, b.logprobs)
    assert a.completion_ids != c.completion_ids
    # chunking the batch keeps the prompt order
    d = run(model, SamplingParams(temperature=0, max_new_tokens=8, n=2), batch_size=2)
    e = run(model, SamplingParams(temperature=0, max_new_tokens=8, n=2))
    assert d.completion_ids == e.completion_ids


def test_length_limit_warning_and_stat(model):
    with pytest.warns(UserWarning, match="zero-reward trap"):
        rb = rollout(model, PROMPTS, SamplingParams(max_new_tokens=4), eos_token_id=None,
                     pad_token_id=0)
    assert rb.stats["frac_hit_length_limit"] == 1.0
    assert "raise max_new_tokens or add a stop" in LENGTH_WARNING
    # every completion stops on its first token: no warning
    greedy = run(model, SamplingParams(temperature=0, max_new_tokens=4))
    firsts = sorted({c[0] for c in greedy.completion_ids})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rb = rollout(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=4,
                                                    stop_token_ids=tuple(firsts)),
                     eos_token_id=None, pad_token_id=0)
    assert rb.stats["frac_hit_length_limit"] == 0.0


def test_model_mode_is_restored(model):
    model.train()
    run(model, SamplingParams(max_new_tokens=2))
    assert model.training
    model.eval()
    run(model, SamplingParams(max_new_tokens=2))
    assert not model.training


def test_bad_inputs_name_the_field(model):
    from alignlab.core.errors import ConfigError

    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ConfigError, match=r"precision: invalid value 'fp16'.*fp32 or bf16"):
        SamplingParams(precision="fp16")
    with pytest.raises(ConfigError, match=r"prompts \[1\] are empty"):
        rollout(model, [[3], []], SamplingParams(), eos_token_id=None, pad_token_id=0)
    with pytest.raises(ConfigError, match="stop strings need a tokenizer"):
        rollout(model, [[3]], SamplingParams(stop=("x",)), eos_token_id=None, pad_token_id=0)


class EvenTokensOnly:
    """A ``LogitsProcessor`` that bans odd token ids and records the engine's calls."""

    def __init__(self):
        self.rows: list[int] = []

    def start(self, input_ids, attention_mask, position_ids, n):
        assert input_ids.shape == attention_mask.shape == position_ids.shape
        self.running = input_ids.shape[0] * n

    def __call__(self, logits):
        assert logits.shape[0] == self.running  # it always sees exactly the rows still running
        self.rows.append(logits.shape[0])
        odd = torch.arange(logits.shape[-1], device=logits.device) % 2 == 1
        return logits.masked_fill(odd, float("-inf"))

    def advance(self, tokens, keep, attention_mask, position_ids):
        self.running = tokens.shape[0]
        assert keep is None or len(keep) == tokens.shape[0]
        assert attention_mask.shape[0] == position_ids.shape[0] == tokens.shape[0]


@pytest.mark.parametrize("compact", [True, False])
def test_logits_processor_restricts_samples_and_logprobs_are_renormalised(model, compact):
    from alignlab.models.logprobs import restricted_token_logprobs

    proc = EvenTokensOnly()
    rb = run(model, SamplingParams(temperature=0.8, max_new_tokens=10, n=3, seed=2),
             eos=8, compact=compact, logits_processor=proc)
    assert all(t % 2 == 0 for c in rb.completion_ids for t in c)
    assert 8 in {t for c in rb.completion_ids for t in c}  # some rows stopped early
    if compact:
        assert proc.rows[-1] < proc.rows[0]  # and were dropped from the processor's rows too
    batch = rb.padded()
    n_scored = int(batch["loss_mask"][:, 1:].sum())
    allowed = (torch.arange(V) % 2 == 0).expand(n_scored, V)
    recomputed = restricted_token_logprobs(model, batch, allowed, temperature=0.8)
    assert torch.allclose(recomputed, batch["old_logprobs"], atol=1e-4)
    assert (batch["old_logprobs"] > token_logprobs(model, batch, temperature=0.8) - 1e-6).all()


@pytest.mark.parametrize("compact", [True, False])
def test_bf16_sampling_runs_the_forwards_under_autocast_like_the_trainer(model, compact):
    """``precision: bf16`` samples as a bf16 trainer computes: every forward under autocast, and
    the sampler's log-probs those of a bf16 teacher-forced pass (kernels apart), not fp32's."""
    seen: list[bool] = []
    hook = model.register_forward_pre_hook(
        lambda *_: seen.append(torch.is_autocast_enabled("cpu")
                               and torch.get_autocast_dtype("cpu") == torch.bfloat16))
    try:
        rb = run(model, SamplingParams(max_new_tokens=10, n=3, seed=1, precision="bf16"),
                 compact=compact)
        under_bf16, seen[:] = list(seen), []
        run(model, SamplingParams(max_new_tokens=10, n=3, seed=1), compact=compact)
    finally:
        hook.remove()
    assert len(under_bf16) >= 10 and all(under_bf16)  # the prefill and every decode step
    assert seen and not any(seen)  # fp32 (the default) runs plain
    assert not torch.is_autocast_enabled("cpu")  # the context ends with the call
    batch = rb.padded()
    mask = batch["loss_mask"].bool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = token_logprobs(model, batch)
    exact = token_logprobs(model, batch)
    assert rb.logprobs.dtype == torch.float32
    to_bf16 = (bf16 - batch["old_logprobs"])[mask].abs()
    to_fp32 = (exact - batch["old_logprobs"])[mask].abs()
    assert to_bf16.mean() < 0.5 * to_fp32.mean(), (to_bf16.mean(), to_fp32.mean())
    assert to_fp32.max() > 1e-3  # bf16's rounding shows: the two precisions are told apart


@pytest.mark.parametrize("compact", [True, False])
def test_bf16_sampling_casts_weights_and_prompt_keys_once_per_rollout(model, compact, monkeypatch):
    """Under bf16 autocast each weight is cast to bf16 once per rollout, not at every decoded
    token (autocast keeps no cast copies under inference_mode), and the prompts' shared keys
    (float32 out of RoPE) are cast once, not by every decode step's matmul."""
    from torch.profiler import ProfilerActivity, profile

    import alignlab.rollout.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "MIN_SHARED_PROMPT_KEYS", 0)  # the prefix-shared decode, here too
    steps = 12
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        rb = run(model, SamplingParams(max_new_tokens=steps, n=3, seed=1, precision="bf16"), compact=compact)
    assert rb.stats["mean_completion_tokens"] == steps  # no eos: every token decoded
    casts = [(tuple(e.input_shapes[0]), e.count) for e in prof.key_averages(group_by_input_shape=True)
             if e.key == "aten::_to_copy" and e.input_shapes and e.input_shapes[0]]
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    weight_casts = sum(n for shape, n in casts if shape in weight_shapes)
    matmul_weights = sum(p.dim() == 2 for p in model.parameters()) - 1  # the embedding is a lookup
    assert weight_casts == matmul_weights  # once each (at every token: ~12x that)
    # the prompts' transposed keys [P, h, d, W], cast once per layer (each decode step's matmul
    # cast them again: 2 layers x 11 steps)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    key_casts = sum(n for shape, n in casts if len(shape) == 4 and shape[0] == len(PROMPTS) and shape[2] == head_dim)
    assert key_casts == model.config.num_hidden_layers
