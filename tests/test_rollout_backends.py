"""The rollout backend interface, and ``sample`` (text in, text out) on the engine."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from conftest import random_llama
from transformers import AutoModelForCausalLM

from alignlab.core.errors import ConfigError
from alignlab.rollout.backends import BuiltinBackend, RolloutBackend, VLLMBackend
from alignlab.rollout.engine import SamplingParams, rollout
from alignlab.rollout.sampling import sample

PROMPTS = [[5, 9, 3], [7, 2, 11, 4]]


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(ConfigError, match=r"pip install 'alignlab\[vllm\]'"):
        VLLMBackend("some/model", tokenizer=None)


def test_builtin_backend_serves_the_engine_and_syncs_weights():
    old, new = random_llama(seed=0), random_llama(seed=1)
    backend = BuiltinBackend(old, eos_token_id=None, pad_token_id=0)
    assert isinstance(backend, RolloutBackend)
    params = SamplingParams(temperature=0, max_new_tokens=5, n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = backend.generate(PROMPTS, params)
        assert before.completion_ids == rollout(old, PROMPTS, params, eos_token_id=None,
                                                pad_token_id=0).completion_ids
        backend.sync_weights(new)
        after = backend.generate(PROMPTS, params)
        expected = rollout(new, PROMPTS, params, eos_token_id=None, pad_token_id=0)
    # (tiny random tied-embedding Llamas repeat the last prompt token, so compare log-probs)
    assert torch.equal(after.logprobs, expected.logprobs)
    assert not torch.allclose(after.logprobs, before.logprobs)


def test_sample_on_the_world_keeps_its_contract(tiny_world):
    tok = tiny_world.tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_world.base_dir)
    prompts = tiny_world.task("positive").eval_prompts[:3]
    s = sample(model, tok, prompts, n=2, max_new_tokens=40, seed=0)
    assert s.prompts == [p for p in prompts for _ in range(2)]
    assert len(s.completions) == len(s.completion_ids) == len(s.finish_reasons) == 6
    eos = tok.eos_token_id
    for text, ids, why, lps in zip(s.completions, s.completion_ids, s.finish_reasons, s.logprobs):
        assert eos not in ids and len(lps) == len(ids)
        assert why in ("eos", "length") and (why == "length") == (len(ids) == 40)
        assert text == tok.decode(ids, skip_special_tokens=True)
    # the pretrained base model ends most reviews by itself
    assert s.finish_reasons.count("eos") >= 4 and s.frac_hit_length_limit <= 2 / 6
    again = sample(model, tok, prompts, n=2, max_new_tokens=40, seed=0)
    assert again.completion_ids == s.completion_ids
    greedy = sample(model, tok, prompts, temperature=0.0, max_new_tokens=40)
    enc = tok(prompts[0], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, do_sample=False, max_new_tokens=40, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    assert greedy.completion_ids[0] == (out[:out.index(eos)] if eos in out else out)
    assert torch.is_tensor(torch.tensor(greedy.logprobs[0]))
