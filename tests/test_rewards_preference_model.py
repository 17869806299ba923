"""The general pairwise preference model: how a pair becomes one sequence (markers, cuts that
treat both responses alike), its loss by hand, saving and loading, the judge on hand-made
logits (swap gives 1 − P, identical responses ½, the cache), and a rock-paper-scissors cycle
that the joint model fits and no scalar reward can."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.core.errors import ConfigError
from alignlab.core.runtime import seed_everything
from alignlab.data.collate import join_prompt_completion, pad_collate
from alignlab.losses.reward import bradley_terry_loss, preference_model_bce
from alignlab.models.heads import CausalLMWithScalarHead
from alignlab.models.loading import load_tokenizer
from alignlab.rewards.judges import PairwiseJudge, PreferenceModelJudge, swap_debiased_verdict
from alignlab.rewards.preference_model import (
    PairEncoder,
    PairFormat,
    PairwisePreferenceModel,
    first_wins,
    read_pair_format,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


class FakeTokenizer:
    """One id per character (ord), no special tokens but a bos (id 1) when asked."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


# ---- the joined sequence ---------------------------------------------------------------------

def test_join_puts_the_markers_between_prompt_and_responses_and_masks_the_prompt():
    enc = PairEncoder(FakeTokenizer(), PairFormat(a_marker="|", b_marker="#", max_length=None))
    out = enc.join([10, 11], [20, 21, 22], [30])
    assert out["input_ids"] == [10, 11, ord("|"), 20, 21, 22, ord("#"), 30]
    assert out["loss_mask"] == [0, 0, 1, 1, 1, 1, 1, 1]
    ab, ba = enc.both_orders([10], [20], [30])
    assert ab["input_ids"] == [10, ord("|"), 20, ord("#"), 30]
    assert ba["input_ids"] == [10, ord("|"), 30, ord("#"), 20]


def test_keep_end_of_prompt_cuts_the_prompt_first_then_gives_both_responses_equal_room():
    enc = PairEncoder(FakeTokenizer(), PairFormat(a_marker="|", b_marker="#", max_length=10))
    prompt = [1, 2, 3, 4, 5, 6]  # a leading bos (1) is kept
    # 6 + 2 + 2 + 2 markers = 12 > 10: the prompt keeps its bos and last 3 tokens
    assert enc.join(prompt, [20, 21], [30, 31])["input_ids"] == [
        1, 4, 5, 6, ord("|"), 20, 21, ord("#"), 30, 31]
    # responses of 5 and 1 tokens: the prompt keeps 8 − 6 = 2 tokens (bos and its last)
    assert enc.join(prompt, [20] * 5, [30])["input_ids"] == [
        1, 6, ord("|"), *[20] * 5, ord("#"), 30]
    # both long: one prompt token, then (10 − 2 − 1) // 2 = 3 tokens each, in either order
    ab, ba = enc.both_orders(prompt, [20, 21, 22, 23], [30, 31, 32, 33, 34])
    assert ab["input_ids"] == [6, ord("|"), 20, 21, 22, ord("#"), 30, 31, 32]
    assert ba["input_ids"] == [6, ord("|"), 30, 31, 32, ord("#"), 20, 21, 22]
    assert not enc.fits(prompt, [20, 21], [30, 31]) and enc.fits([1], [2], [3])


def test_truncate_completion_keeps_the_prompt_while_the_responses_can_shrink():
    enc = PairEncoder(FakeTokenizer(), PairFormat(a_marker="|", b_marker="#", max_length=10,
                                                  truncation="truncate_completion"))
    out = enc.join([1, 2, 3, 4], [20, 21, 22], [30, 31, 32])
    assert out["input_ids"] == [1, 2, 3, 4, ord("|"), 20, 21, ord("#"), 30, 31]
    # a prompt that leaves less than a token per response is cut to leave two: the short
    # response keeps its one, the long one gets the other
    assert enc.join([1, 2, 3, 4, 5, 6, 7, 8], [20, 21], [30])["input_ids"] == [
        1, 4, 5, 6, 7, 8, ord("|"), 20, ord("#"), 30]
    tight = PairEncoder(FakeTokenizer(), PairFormat(a_marker="|", b_marker="#", max_length=3))
    assert tight.join([5], [20], [30]) is None  # no room for a token of each response


@pytest.mark.parametrize("fmt,match", [
    ({"a_marker": ""}, "markers"), ({"a_marker": "x", "b_marker": "x"}, "markers"),
    ({"truncation": "drop"}, "allowed values: keep_end_of_prompt, truncate_completion"),
    ({"max_length": 0}, "max_length"),
])
def test_bad_pair_formats_are_refused(fmt, match):
    with pytest.raises(ConfigError, match=match):
        PairFormat(**fmt)


# ---- the loss ----------------------------------------------------------------------------------

def test_preference_model_bce_by_hand():
    logits, targets = torch.tensor([0.0, 2.0, 2.0, -1.0]), torch.tensor([1.0, 1.0, 0.5, 0.0])
    expected = [math.log(2), -math.log(sigmoid(2)),
                -0.5 * math.log(sigmoid(2)) - 0.5 * math.log(sigmoid(-2)), -math.log(sigmoid(1))]
    assert preference_model_bce(logits, targets).tolist() == pytest.approx(expected, abs=1e-6)


def test_preference_model_bce_pushes_the_logit_towards_the_label():
    logits = torch.zeros(3, requires_grad=True)
    preference_model_bce(logits, torch.tensor([1.0, 0.0, 0.5])).sum().backward()
    assert logits.grad[0] < 0 < logits.grad[1] and logits.grad[2] == 0


# ---- the judge on logits we set ------------------------------------------------------------------

class LookupModel(PairwisePreferenceModel):
    """A preference model whose logit for a joined sequence is looked up (0 when unknown)."""

    def __init__(self, fmt: PairFormat, table: dict[tuple[int, ...], float]) -> None:
        torch.nn.Module.__init__(self)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.format, self.table, self.sequences = fmt, table, 0

    def logits(self, batch):
        rows = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            rows.append(self.table.get(tuple(ids[mask.bool()].tolist()), 0.0))
        self.sequences += len(rows)
        return torch.tensor(rows)


@pytest.fixture(scope="module")
def world_tokenizer(tiny_world):
    return load_tokenizer(str(tiny_world.base_dir))


def lookup_judge(tokenizer, logits: dict[tuple[str, str], float], **kwargs):
    """A judge whose model gives ``logits[(first, second)]`` for prompt "the food was"."""
    fmt = PairFormat()
    enc = PairEncoder(tokenizer, fmt)
    prompt = tokenizer("the food was", add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"] + eos

    table = {tuple(enc.join(prompt, ids(x), ids(y))["input_ids"]): s for (x, y), s in logits.items()}
    model = LookupModel(fmt, table)
    return PreferenceModelJudge(model, tokenizer, **kwargs), model


def test_judge_averages_both_orders_so_a_swap_gives_one_minus_p(world_tokenizer):
    judge, model = lookup_judge(world_tokenizer, {(" good .", " bad ."): 2.0,
                                                  (" bad .", " good ."): -1.0})
    assert isinstance(judge, PairwiseJudge)
    [v, w] = judge.judge(["the food was"] * 2, [" good .", " bad ."], [" bad .", " good ."])
    p = (sigmoid(2.0) + 1 - sigmoid(-1.0)) / 2
    assert v.p_a == pytest.approx(p, abs=1e-6) and v.a_preferred is True
    assert v.detail == {"p_ab": pytest.approx(sigmoid(2.0)), "p_ba": pytest.approx(sigmoid(-1.0))}
    assert w.p_a == pytest.approx(1 - p, abs=1e-6) and w.a_preferred is False
    assert model.sequences == 4  # both orders of both pairs


def test_a_judge_that_only_looks_at_positions_says_half_and_a_tie(world_tokenizer):
    judge, _ = lookup_judge(world_tokenizer, {(" good .", " bad ."): 3.0,
                                              (" bad .", " good ."): 3.0})
    [v] = judge.judge(["the food was"], [" good ."], [" bad ."])
    assert v.p_a == 0.5 and v.a_preferred is None


def test_without_debias_the_judge_reads_a_shown_first(world_tokenizer):
    judge, model = lookup_judge(world_tokenizer, {(" good .", " bad ."): 2.0}, debias=False)
    [v] = judge.judge(["the food was"], [" good ."], [" bad ."])
    assert v.p_a == pytest.approx(sigmoid(2.0)) and v.detail["p_ba"] is None
    assert model.sequences == 1
    assert swap_debiased_verdict(0.7, None).p_a == 0.7
    # Within float32's rounding of ½ is a tie (one sequence in two rows of a batch: ~3e-8 apart
    # on an AVX512 CPU); a millionth and more is a preference.
    tie = swap_debiased_verdict(0.15740741789, 0.15740738809)
    assert tie.p_a == 0.5 and tie.a_preferred is None
    close = swap_debiased_verdict(0.5 + 3e-6, 0.5 - 3e-6)
    assert close.p_a == pytest.approx(0.5 + 3e-6) and close.a_preferred is True


def test_judge_caches_verdicts_on_disk_under_the_models_identity(world_tokenizer, tmp_path):
    logits = {(" good .", " bad ."): 2.0}
    judge, model = lookup_judge(world_tokenizer, logits, cache_path=tmp_path / "v.jsonl")
    args = (["the food was"], [" good ."], [" bad ."])
    first = judge.judge(*args)
    assert judge.cached(*args) == [True] and judge.judge(*args) == first
    assert model.sequences == 2 and judge.counters() == {"hits": 1, "misses": 1}
    again, model2 = lookup_judge(world_tokenizer, logits, cache_path=tmp_path / "v.jsonl")
    assert again.judge(*args)[0].p_a == pytest.approx(first[0].p_a) and model2.sequences == 0
    other, _ = lookup_judge(world_tokenizer, logits, cache_path=tmp_path / "v.jsonl",
                            debias=False)
    assert other.cached(*args) == [False]  # a different reading is a different identity


# ---- a real model: identical responses, save and load ------------------------------------------

def test_real_model_swap_and_identical_responses_and_a_round_trip(tiny_world, world_tokenizer,
                                                                  tmp_path):
    seed_everything(0)
    fmt = PairFormat(a_marker="\nfirst:", b_marker="\nsecond:", max_length=200)
    model = PairwisePreferenceModel.from_causal_lm(str(tiny_world.base_dir), fmt)
    judge = PreferenceModelJudge(model, world_tokenizer)
    prompts, a, b = ["the food was", "the staff"], [" great .", " rude ."], [" bad .", " kind ."]
    forward, backward = judge.judge(prompts, a, b), judge.judge(prompts, b, a)
    for v, w in zip(forward, backward):
        assert v.p_a + w.p_a == pytest.approx(1.0, abs=1e-12) and v.p_a != pytest.approx(0.5)
    [same] = judge.judge(["the food was"], [" great ."], [" great ."])
    assert same.p_a == 0.5 and same.a_preferred is None

    model.save_pretrained(tmp_path / "pm", pad_token_id=world_tokenizer.pad_token_id)
    world_tokenizer.save_pretrained(tmp_path / "pm")
    assert (tmp_path / "pm" / "model.safetensors").exists()
    assert read_pair_format(tmp_path / "pm") == fmt
    loaded = PreferenceModelJudge.from_pretrained(tmp_path / "pm")
    assert not any(p.requires_grad for p in loaded.model.parameters())
    for v, w in zip(forward, loaded.judge(prompts, a, b)):
        assert w.p_a == pytest.approx(v.p_a, abs=1e-5)
    with pytest.raises(ConfigError, match="not a pairwise preference model"):
        read_pair_format(tiny_world.base_dir)


# ---- non-transitive preferences --------------------------------------------------------------------

# Seed 0, the tiny world's base model, 80 Adam steps at lr 3e-3 on the three cyclic pairs (both
# orders): the joint model reached P ≥ 0.999 on every pair of the cycle (0.99 after 60 steps);
# the Bradley-Terry reward model on the same pairs and steps sat at 0.500 ± 0.001 on each
# (equal rewards are its optimum: the three differences sum to 0).
CYCLE = [(" rock", " scissors"), (" scissors", " paper"), (" paper", " rock")]


def test_the_joint_model_fits_rock_paper_scissors_and_a_scalar_reward_cannot(tiny_world,
                                                                             world_tokenizer):
    from alignlab.algorithms.preference_model.trainer import (
        PreferenceModelObjective,
        collate_pairs,
    )

    tok, prompt = world_tokenizer, "pick one :"
    enc = PairEncoder(tok, PairFormat())

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    examples = [dict(zip(("ab", "ba"), enc.both_orders(p_ids, ids(w), ids(lo))), target=1.0)
                for w, lo in CYCLE]
    seed_everything(0)
    joint = PairwisePreferenceModel.from_causal_lm(str(tiny_world.base_dir), PairFormat())
    seed_everything(0)
    scalar = CausalLMWithScalarHead.from_causal_lm(str(tiny_world.base_dir))
    batch = collate_pairs(examples, tok.pad_token_id)
    singles = pad_collate([join_prompt_completion(p_ids, ids(y))  # the 3 winners, the 3 losers
                           for y in [w for w, _ in CYCLE] + [lo for _, lo in CYCLE]],
                          tok.pad_token_id)
    objective = PreferenceModelObjective()
    opt_joint = torch.optim.Adam(joint.parameters(), lr=3e-3)
    opt_scalar = torch.optim.Adam(scalar.parameters(), lr=3e-3)
    for _ in range(80):
        opt_joint.zero_grad()
        objective.loss(joint, batch).loss_sum.backward()
        opt_joint.step()
        opt_scalar.zero_grad()
        r = scalar.sequence_values(singles)
        bradley_terry_loss(r[:3], r[3:]).sum().backward()
        opt_scalar.step()

    verdicts = PreferenceModelJudge(joint, tok).judge([prompt] * 3, *zip(*CYCLE))
    assert min(v.p_a for v in verdicts) > 0.9, [v.p_a for v in verdicts]
    with torch.no_grad():
        r = scalar.eval().sequence_values(singles)
    p_scalar = torch.sigmoid(r[:3] - r[3:])
    # the three reward differences sum to 0, so one of them is ≤ 0: P ≤ ½ on that pair
    assert float(p_scalar.min()) <= 0.5
    assert float((p_scalar - 0.5).abs().max()) < 0.05, p_scalar
    assert first_wins(joint, [examples[0]["ab"]], tok.pad_token_id).shape == (1,)
