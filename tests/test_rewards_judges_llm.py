"""The LLM judge: P(a ≻ b) from label probabilities by hand (a stub model whose logits we set),
position-swap debiasing, generated answers and their parse errors, batching, the disk cache."""

from __future__ import annotations

import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from alignlab.core.errors import ConfigError
from alignlab.models.fingerprint import directory_fingerprint
from alignlab.models.loading import load_tokenizer
from alignlab.rewards.judges import (
    DEFAULT_TEMPLATE,
    JudgeParseError,
    JudgeTemplate,
    LLMJudge,
    PairwiseJudge,
    judge_pairs,
)

from conftest import random_llama


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def shown(text: str) -> tuple[str, str]:
    """The responses shown first and second in a rendered default template."""
    first = text.split("Response A:")[1].split("Response B:")[0]
    second = text.split("Response B:")[1].split("Which response")[0]
    return first, second


class StubJudgeModel(nn.Module):
    """Logits we control: at every position the token "A" gets
    ``first_bias + strength · (good(first) − good(second))`` and every other token 0, where
    ``good(x)`` is 1 when the response contains "good"; so ``P(A) = σ(that)`` against "B"."""

    def __init__(self, tokenizer, strength: float = 10.0, first_bias: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.strength, self.first_bias = tokenizer, strength, first_bias
        self.a_id = tokenizer("A", add_special_tokens=False)["input_ids"][0]
        self.forwards = 0

    def score(self, text: str) -> float:
        first, second = shown(text)
        return self.first_bias + self.strength * (("good" in first) - ("good" in second))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        self.forwards += 1
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for row, ids in enumerate(input_ids):
            keep = ids if attention_mask is None else ids[attention_mask[row].bool()]
            logits[row, :, self.a_id] = self.score(self.tokenizer.decode(keep))
        return SimpleNamespace(logits=logits + 0 * self.weight)


class StubAnswerModel(nn.Module):
    """Generates text: ``answer(first, second)`` after the prompt."""

    def __init__(self, tokenizer, answer) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answer = tokenizer, answer

    def generate(self, input_ids, attention_mask, do_sample, max_new_tokens, pad_token_id):
        assert do_sample is False
        outs = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tokenizer.decode(ids[mask.bool()])
            outs.append(self.tokenizer(self.answer(*shown(text)), add_special_tokens=False)["input_ids"])
        width = max(map(len, outs))
        new = torch.tensor([x + [pad_token_id] * (width - len(x)) for x in outs])
        return torch.cat([input_ids, new], dim=1)


@pytest.fixture(scope="module")
def tok(tiny_world):
    return load_tokenizer(str(tiny_world.base_dir))


SINGLE_TOKEN = JudgeTemplate(DEFAULT_TEMPLATE.text + " ", "test-single", labels=("A", "B"))


@pytest.mark.parametrize("template", [DEFAULT_TEMPLATE, SINGLE_TOKEN], ids=["two-token", "one-token"])
def test_probabilities_by_hand_sure_pair_tie_and_swap(tok, template):
    # The default labels " A"/" B" are two tokens in the world's tokenizer (a space, then the
    # letter): scored as continuations; "A"/"B" are one token each: one next-token read.
    judge = LLMJudge(StubJudgeModel(tok, strength=0.5, first_bias=1.0), tok, template=template)
    assert isinstance(judge, PairwiseJudge)
    good, bad = "a good soup", "a cold soup"
    v = judge.judge(["p", "p", "p", "p"], [good, bad, good, bad], [bad, good, "good too", "cold"])
    # a shown first: σ(1 + 0.5); b shown first: σ(1 − 0.5); debiased: their average as P(a ≻ b)
    sure = (sigmoid(1.5) + 1 - sigmoid(0.5)) / 2
    assert v[0].p_a == pytest.approx(sure, abs=1e-6) and v[0].a_preferred is True
    assert v[0].detail["p_ab"] == pytest.approx(sigmoid(1.5), abs=1e-6)
    assert v[0].detail["p_ba"] == pytest.approx(sigmoid(0.5), abs=1e-6)
    assert v[1].p_a == pytest.approx(1 - sure, abs=1e-6) and v[1].a_preferred is False  # swapped
    # both good / neither: only the position bias speaks, and debiasing cancels it exactly
    assert v[2].p_a == 0.5 and v[2].a_preferred is None
    assert v[3].p_a == 0.5 and v[3].a_preferred is None


def test_a_sure_pair_is_near_one_and_debiasing_is_what_removes_the_position_bias(tok):
    strong = LLMJudge(StubJudgeModel(tok, strength=12.0, first_bias=3.0), tok)
    v = strong.judge(["p", "p"], ["good", "bad"], ["bad", "good"])
    assert v[0].p_a > 0.999 and v[1].p_a < 0.001
    biased = LLMJudge(StubJudgeModel(tok, strength=0.0, first_bias=2.0), tok, debias=False)
    [tie] = biased.judge(["p"], ["same quality"], ["equal quality"])
    assert tie.p_a == pytest.approx(sigmoid(2.0), abs=1e-6)  # prefers whatever is shown first
    assert tie.detail["p_ba"] is None


def test_generate_mode_reads_the_answer_and_debiases(tok):
    def says(first, second):
        return " A." if "good" in first else " B" if "good" in second else " A"  # ties → first

    judge = LLMJudge(StubAnswerModel(tok, says), tok, mode="generate")
    v = judge.judge(["p", "p", "p"], ["good", "bad", "meh"], ["bad", "good", "fine"])
    assert [x.p_a for x in v] == [1.0, 0.0, 0.5]
    assert [x.a_preferred for x in v] == [True, False, None]


def test_an_unparseable_answer_names_the_example_and_the_output_or_is_skipped(tok):
    def says(first, second):
        return " no idea" if "odd" in first + second else " A"

    judge = LLMJudge(StubAnswerModel(tok, says), tok, mode="generate", debias=False)
    with pytest.raises(JudgeParseError, match=r"example 1 \(a shown first\): output ' no idea'"):
        judge.judge(["p", "p"], ["x", "odd"], ["y", "z"])
    swapped = LLMJudge(StubAnswerModel(tok, lambda f, s: " ???" if f.strip() == "odd" else " A"),
                       tok, mode="generate")
    with pytest.raises(JudgeParseError, match=r"example 0 \(b shown first"):
        swapped.judge(["p"], ["x"], ["odd"])  # only the position-swapped answer fails
    skipping = LLMJudge(StubAnswerModel(tok, says), tok, mode="generate", on_parse_error="skip")
    counts: Counter = Counter()
    pairs = judge_pairs(["p0", "p1"], [["x", "y"], ["odd", "z"]], skipping, counts=counts)
    assert [p.group for p in pairs] == [0] and counts["skipped"] == 1
    assert skipping.parse_skips == 1


def test_the_cache_stops_the_model_from_running_again_and_survives_a_new_judge(tok, tmp_path):
    path = tmp_path / "judge.jsonl"
    model = StubJudgeModel(tok, strength=3.0)
    judge = LLMJudge(model, tok, cache_path=path, batch_size=3)
    prompts, a, b = ["p"] * 4, ["good 1", "bad 2", "good 3", "good 1"], ["bad", "good", "x", "bad"]
    first = judge.judge(prompts, a, b)
    ran = model.forwards
    assert ran > 0 and judge.cache.counters() == {"hits": 1, "misses": 3}  # a repeat is a hit
    assert judge.cached(prompts, a, b) == [True] * 4
    again = judge.judge(prompts, a, b)
    assert model.forwards == ran and judge.cache.counters() == {"hits": 5, "misses": 3}
    assert [v.p_a for v in again] == [v.p_a for v in first]
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 3 and set(lines[0]) == {"key", "p_a", "a_preferred", "detail"}
    fresh_model = StubJudgeModel(tok, strength=3.0)  # same weights, so the same fingerprint
    reread = LLMJudge(fresh_model, tok, cache_path=path)
    assert [v.p_a for v in reread.judge(prompts, a, b)] == [v.p_a for v in first]
    assert fresh_model.forwards == 0 and reread.cache.counters() == {"hits": 4, "misses": 0}
    # a new template version (or another model) is another judge: nothing is reused
    other = LLMJudge(fresh_model, tok, cache_path=path,
                     template=JudgeTemplate(DEFAULT_TEMPLATE.text, "pairwise-ab-v2"))
    assert other.cached(prompts, a, b) == [False] * 4


def test_a_real_causal_lm_batched_any_way_gives_the_same_probabilities(tok):
    model = random_llama(vocab_size=len(tok), hidden=32, layers=2, seed=3)
    prompts = ["review of the cafe :", "review of the film :", "hello"]
    a, b = ["the soup was good .", "dull", "yes"], ["the soup was cold and sad .", "great fun", "no"]
    one = LLMJudge(model, tok, batch_size=1).judge(prompts, a, b)
    many = LLMJudge(model, tok, batch_size=16).judge(prompts, a, b)
    swapped = LLMJudge(model, tok, batch_size=5).judge(prompts, b, a)
    for x, y, s in zip(one, many, swapped):
        assert 0 < x.p_a < 1
        assert x.p_a == pytest.approx(y.p_a, abs=1e-5)
        assert s.p_a == pytest.approx(1 - x.p_a, abs=1e-5)  # debiasing makes the swap exact


def test_generate_mode_runs_a_real_causal_lm_and_counts_what_it_cannot_read(tok):
    model = random_llama(vocab_size=len(tok), hidden=32, layers=2, seed=1).train()
    judge = LLMJudge(model, tok, mode="generate", on_parse_error="skip", max_new_tokens=4)
    verdicts = judge.judge(["hello", "review :"], ["yes", "good"], ["no", "bad"])
    assert all(v is None or v.p_a in (0.0, 0.5, 1.0) for v in verdicts)
    assert judge.parse_skips == sum(v is None for v in verdicts)
    assert model.training  # judging put it in eval mode only while it ran


def test_from_pretrained_fingerprints_the_files(tiny_world):
    judge = LLMJudge.from_pretrained(str(tiny_world.base_dir))
    assert judge.fingerprint == directory_fingerprint(tiny_world.base_dir)
    [v] = judge.judge(["review of the cafe :"], ["the soup was good ."], ["it was bad ."])
    assert 0 < v.p_a < 1


def test_bad_templates_and_settings_are_refused(tok):
    with pytest.raises(ConfigError, match=r"\{b\}"):
        JudgeTemplate("{prompt} {a}", "v")
    with pytest.raises(ConfigError, match="labels"):
        JudgeTemplate("{prompt} {a} {b}", "v", labels=("A", " A"))
    with pytest.raises(ConfigError, match="group"):
        JudgeTemplate("{prompt} {a} {b}", "v", pattern="[AB]")
    with pytest.raises(ConfigError, match="allowed values: logprob, generate"):
        LLMJudge(StubJudgeModel(tok), tok, mode="score")
    assert JudgeTemplate("{prompt}|{a}|{b}", "v").render("p", "{b}", "x") == "p|{b}|x"
