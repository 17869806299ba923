"""``sample`` (text in, text out) on the rollout engine."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from alignlab.rollout.sampling import sample

PROMPTS = [[5, 9, 3], [7, 2, 11, 4]]


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
    # the reported log-probs are the model's own: log-softmax at each step of the greedy path
    ids = enc["input_ids"][0].tolist() + greedy.completion_ids[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    start = enc["input_ids"].shape[1]
    steps = torch.log_softmax(logits[start - 1:-1], -1)
    expected = steps.gather(-1, torch.tensor(greedy.completion_ids[0])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(greedy.logprobs[0]), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(steps.argmax(-1), torch.tensor(greedy.completion_ids[0]))
