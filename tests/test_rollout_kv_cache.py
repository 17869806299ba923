"""The rollout's KV cache (in-place buffers, each prompt's keys once) samples exactly what
transformers' DynamicCache samples, and keeps each prompt's keys once."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from alignlab.rollout import engine, kv_cache
from alignlab.rollout.engine import SamplingParams, rollout
from alignlab.rollout.kv_cache import (
    BufferLayer,
    PrefixSharedAttention,
    PrefixSharedLayer,
    rollout_cache,
)


def _llama(kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, intermediate_size=96,
                      max_position_embeddings=256, pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 97, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(5)]


@pytest.mark.parametrize("kv_heads,n,compact,shared", [
    (4, 3, True, True), (4, 3, False, True), (2, 3, True, True), (4, 3, True, False),
    (4, 1, True, False)])
def test_samples_equal_those_of_transformers_dynamic_cache(monkeypatch, kv_heads, n, compact, shared):
    """Prompts of uneven length (left padding), rows that stop early (four eos ids: the rows of a
    prompt are then uneven, the non-uniform path), grouped-query heads, n = 1; the prefix-shared
    layers (forced at this size) and the buffer layers."""
    monkeypatch.setattr(kv_cache, "MIN_SHARED_PROMPT_KEYS", 0 if shared else 1 << 60)
    model, prompts = _llama(kv_heads), _prompts()
    params = SamplingParams(temperature=1.0, max_new_tokens=30, n=n, seed=0)

    def run():
        return rollout(model, prompts, params, eos_token_id=[1, 5, 7, 9], pad_token_id=0,
                       compact=compact, warn_length=False)

    ours = run()
    monkeypatch.setattr(engine, "rollout_cache", lambda config, *_, **__: (DynamicCache(config=config), None))
    theirs = run()
    assert ours.completion_ids == theirs.completion_ids
    assert torch.allclose(ours.logprobs, theirs.logprobs, atol=1e-5)
    lengths = {len(c) for c in ours.completion_ids}
    assert len(lengths) >= 2 and 30 in lengths  # early stops and full-length rows both ran


def _prefill(model, cache, mode, prompts, n):
    """Prefill ``prompts`` into ``cache`` under ``mode`` (entered by the caller) and repeat each
    ``n`` times; ``(ids, step)``, ``step()`` running one decode step of token 3 on every row."""
    ids, mask = engine._left_pad(prompts, 0, torch.device("cpu"))
    mode.set_prompt_mask(mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    cache.batch_repeat_interleave(n)
    rows = len(prompts) * n
    mask = torch.cat([mask.repeat_interleave(n, 0), torch.ones(rows, 1, dtype=mask.dtype)], 1)

    def step():
        return model(input_ids=torch.full((rows, 1), 3), attention_mask=mask,
                     position_ids=pos[:, -1:].repeat_interleave(n, 0) + 1, cache=cache, use_cache=True)

    return ids, step


def test_prefix_shared_layers_keep_each_prompt_once(monkeypatch):
    """After the prefill and the repeat, each layer holds the P prompts' keys once and the
    sampled keys of P·n rows; dropping rows keeps the owners in order."""
    model, prompts = _llama(4), _prompts()[:3]
    cache, mode = rollout_cache(model.config, 19, 8, torch.device("cpu"), rows=3, n=4)
    assert mode is None  # too small to pay for the mode
    monkeypatch.setattr(kv_cache, "MIN_SHARED_PROMPT_KEYS", 3 * 4 * 19 * 64)
    cache, mode = rollout_cache(model.config, 19, 8, torch.device("cpu"), rows=3, n=4)
    assert isinstance(mode, PrefixSharedAttention)
    assert all(isinstance(layer, PrefixSharedLayer) for layer in cache.layers)
    with torch.no_grad(), mode:
        ids, step = _prefill(model, cache, mode, prompts, n=4)
        step()
    layer = cache.layers[0]
    assert layer.prefix_k.shape[0] == 3 and layer.suffix.keys.shape[:3] == (12, 4, 1)
    assert cache.get_seq_length() == ids.shape[1] + 1
    assert layer.uniform and layer.rows_per_prompt == 4
    cache.batch_select_indices(torch.tensor([0, 1, 5, 6, 7, 11]))
    assert layer.owner.tolist() == [0, 0, 1, 1, 1, 2] and layer.slot.tolist() == [0, 1, 0, 1, 2, 0]
    assert not layer.uniform and layer.rows_per_prompt == 3


def test_buffer_layer_behaves_as_dynamic_layer():
    """Appends, repeats, row selection, cropping and growth past the capacity give the keys and
    values of transformers' DynamicLayer."""
    g = torch.Generator().manual_seed(0)
    ours, theirs = BufferLayer(capacity=5), DynamicLayer()

    def step(t: int) -> None:
        rows = 2 if theirs.get_seq_length() == 0 else theirs.keys.shape[0]
        k, v = torch.randn(rows, 3, t, 4, generator=g), torch.randn(rows, 3, t, 4, generator=g)
        a, b = ours.update(k, v), theirs.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    step(3)
    ours.batch_repeat_interleave(3)
    theirs.batch_repeat_interleave(3)
    step(1)
    idx = torch.tensor([0, 2, 5])
    ours.batch_select_indices(idx)
    theirs.batch_select_indices(idx)
    step(1)
    step(4)  # 9 tokens: past the capacity of 5, the buffer grows
    assert ours.capacity >= 9 and ours.get_seq_length() == theirs.get_seq_length() == 9
    ours.crop(-2)
    theirs.crop(-2)
    assert torch.equal(ours.keys, theirs.keys) and ours.get_seq_length() == 7


def test_the_cache_kind_follows_the_model_the_device_and_the_size():
    model = _llama(4)
    big = {"rows": 64, "n": 8}  # 64·8·256·64 keys ≥ MIN_SHARED_PROMPT_KEYS
    cache, mode = rollout_cache(model.config, 256, 5, torch.device("cpu"), **big)
    assert mode is not None and all(isinstance(x, PrefixSharedLayer) for x in cache.layers)
    for kwargs in ({"rows": 64, "n": 1}, {"rows": 2, "n": 8}):  # nothing shared; too small
        cache, mode = rollout_cache(model.config, 256, 5, torch.device("cpu"), **kwargs)
        assert mode is None and all(isinstance(x, BufferLayer) and x.capacity == 261 for x in cache.layers)
    cache, mode = rollout_cache(model.config, 256, 5, torch.device("meta"), **big)
    assert mode is None and all(isinstance(x, BufferLayer) for x in cache.layers)
    model.config._attn_implementation = "eager"  # its attention would not see the prompt keys
    cache, mode = rollout_cache(model.config, 256, 5, torch.device("cpu"), **big)
    assert mode is None and all(isinstance(x, BufferLayer) for x in cache.layers)
    model.config.sliding_window, model.config.layer_types = 4, ["sliding_attention"] * 2
    model.config.use_sliding_window = True
    cache, mode = rollout_cache(model.config, 256, 5, torch.device("cpu"), **big)
    assert mode is None and not any(isinstance(x, (BufferLayer, PrefixSharedLayer)) for x in cache.layers)


def _shared_mode(monkeypatch, model, rows=3, n=4, width=19):
    monkeypatch.setattr(kv_cache, "MIN_SHARED_PROMPT_KEYS", 1)
    return rollout_cache(model.config, width, 8, torch.device("cpu"), rows=rows, n=n)


def test_the_attention_implementation_is_restored_after_a_rollout(monkeypatch):
    """The mode swaps the model's attention implementation only while it is entered, even when
    the body raises; a forward in another thread meanwhile runs plain SDPA (same logits)."""
    import threading

    model = _llama(4)
    cache, mode = _shared_mode(monkeypatch, model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    seen = {}

    def other_thread():
        assert model.config._attn_implementation == kv_cache.ATTENTION_NAME
        with torch.no_grad():
            seen["logits"] = model(input_ids=ids).logits

    with mode:
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert torch.allclose(seen["logits"], expected, atol=1e-6)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ZeroDivisionError), mode:
        assert model.config._attn_implementation == kv_cache.ATTENTION_NAME
        1 / 0
    assert model.config._attn_implementation == "sdpa" and mode.current is None


def test_a_model_whose_attention_skips_the_interface_is_refused(monkeypatch):
    """If a decode step's keys reach no attention call through transformers' interface, the
    prompt keys were never attended to: the next layer's cache update raises."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model, prompts = _llama(4), _prompts()[:3]
    cache, mode = _shared_mode(monkeypatch, model)
    with torch.no_grad(), mode:
        _, step = _prefill(model, cache, mode, prompts, n=4)
        # as a model with its own attention code: it attends to the keys it is given, no more
        AttentionInterface.register("test_own_attention", lambda module, q, k, v, mask, **kw:
                                    sdpa_attention_forward(module, q, k, v, None, **kw))
        model.config._attn_implementation = "test_own_attention"
        with pytest.raises(RuntimeError, match="attention interface"):
            step()
