"""The bench's evaluation metrics by value: distinct-n, BLEU and self-BLEU, pass@k, the t
interval, win rates, best-of-n, and the Monte-Carlo KL estimator against known KLs (two
categorical distributions; two small language models, their KL enumerated exactly)."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch

from alignlab.eval.best_of_n import best_of_n_sample
from alignlab.eval.diversity import distinct_n, self_bleu, sentence_bleu
from alignlab.eval.intervals import t_interval, t_quantile_975
from alignlab.eval.kl import best_of_n_kl, mc_kl, sequence_logprobs
from alignlab.eval.passk import mean_pass_at_k, pass_at_k
from alignlab.eval.win_rate import annotator_win_rate, bradley_terry_win_rate
from alignlab.rewards.annotator import SimulatedAnnotator
from alignlab.rollout.engine import SamplingParams, rollout
from alignlab.rollout.sampling import sample

from conftest import random_llama


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # unigrams a b a b a b c: 3 distinct of 7; bigrams ab ba ab | ab bc: 3 distinct of 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)


def test_sentence_bleu_by_hand():
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    # p1 = 5/6 (the ×2, cat, on, mat), p2 = 3/5 (the cat, on the, the mat), BP = 1
    assert sentence_bleu(hyp, [ref], max_n=2) == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    # p3 = 1/4 (on the mat), p4 = 0 matches of 3 → smoothed 0.1/3
    assert sentence_bleu(hyp, [ref]) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25)
    # a 2-word hypothesis: orders 1–2 only, both exact; brevity penalty exp(1 − 6/2)
    assert sentence_bleu(["the", "cat"], [ref]) == pytest.approx(math.exp(-2))
    # clipping: "the the the" against "the cat" matches the once
    assert sentence_bleu(["the"] * 3, [["the", "cat"]], max_n=1) == pytest.approx(1 / 3)
    assert sentence_bleu([], [ref]) == 0.0


def test_self_bleu_by_hand():
    texts = ["a b c d", "a b c d", "w x y z"]
    # the two copies score 1; the odd one matches nothing: (0.1/4 · 0.1/3 · 0.1/2 · 0.1/1)^¼
    odd = (0.1 ** 4 / 24) ** 0.25
    assert self_bleu(texts) == pytest.approx((2 + odd) / 3)
    assert self_bleu(["only one"]) == 0.0


def test_self_bleu_equals_sentence_bleu_against_the_others():
    rng = random.Random(0)
    words = "a b c d e f".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) for _ in range(25)]
    split = [t.split() for t in texts]
    naive = [sentence_bleu(w, split[:i] + split[i + 1:]) for i, w in enumerate(split)]
    assert self_bleu(texts) == pytest.approx(sum(naive) / len(naive))


def test_pass_at_k_by_hand_and_against_the_binomial_formula():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 − C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 − C(7,5)/C(10,5)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    for n, c, k in itertools.product(range(1, 9), range(0, 9), range(1, 9)):
        if c <= n and k <= n:
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert mean_pass_at_k([[True, False, False, False], [False] * 4], 1) == pytest.approx(0.125)
    assert mean_pass_at_k([[True, False, False, False], [False] * 4], 4) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_t_interval_by_hand():
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t_{0.975,2} = 4.303
    assert iv.mean == 2.0 and iv.half_width == pytest.approx(4.303 / math.sqrt(3))
    assert (iv.low, iv.high) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    one = t_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.half_width)
    assert t_interval([1.0, float("nan"), 3.0]).n == 2
    assert t_quantile_975(1) == 12.706 and t_quantile_975(35) == 2.042 and t_quantile_975(5000) == 1.96


def test_win_rates_by_hand():
    assert bradley_terry_win_rate([1.0, 0.0], [0.0, 0.0]) == pytest.approx((1 / (1 + math.exp(-1)) + 0.5) / 2)
    # an annotator without noise: the longer completion wins; equal gold is a tie (½)
    annotator = SimulatedAnnotator(gold=lambda p, c: [float(len(x)) for x in c], temperature=0,
                                   flip_rate=0.0, tie_margin=0.0)
    assert annotator_win_rate(annotator, ["p"] * 3, ["aa", "a", "b"], ["a", "aa", "c"]) == pytest.approx(0.5)


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)


def test_mc_kl_on_two_categorical_distributions():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    exact = float((p * (p / q).log()).sum())  # 0.5 ln 2.5 + 0.2 ln 0.4 = 0.27489
    assert exact == pytest.approx(0.5 * math.log(2.5) + 0.2 * math.log(0.4))
    y = torch.multinomial(p, 40_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = mc_kl(p.log()[y].tolist(), q.log()[y].tolist())
    assert abs(est.mean - exact) < 4 * est.stderr and est.stderr < 0.005
    assert mc_kl(p.log()[y].tolist(), p.log()[y].tolist()).mean == 0.0


@torch.no_grad()
def _exact_two_token_kl(policy, ref, prompt: list[int], eos: int) -> float:
    """KL(π‖ref) over completions of at most two tokens, ending early at ``eos``: enumerated."""
    def dists(model, rows):
        logits = model(input_ids=torch.tensor(rows)).logits[:, -1].float()
        return torch.log_softmax(logits, -1)

    lp1, lq1 = dists(policy, [prompt])[0], dists(ref, [prompt])[0]
    rows = [prompt + [t] for t in range(lp1.numel())]
    lp2, lq2 = dists(policy, rows), dists(ref, rows)
    kl2 = (lp2.exp() * (lp2 - lq2)).sum(-1)  # KL of the second token after each first token
    kl2[eos] = 0.0  # a completion that ended on eos has no second token
    return float((lp1.exp() * (lp1 - lq1 + kl2)).sum())


@pytest.mark.filterwarnings("ignore:.*cut at max_new_tokens")
def test_mc_kl_of_sampled_completions_matches_the_enumerated_kl():
    policy = random_llama(vocab_size=32, hidden=32, seed=0).eval()
    ref = copy.deepcopy(policy)
    torch.manual_seed(1)
    with torch.no_grad():
        ref.lm_head.weight.add_(0.1 * torch.randn_like(ref.lm_head.weight))
    prompt, eos, pad = [5, 6, 7], 1, 0
    exact = _exact_two_token_kl(policy, ref, prompt, eos)
    assert 0.5 < exact < 2.0  # 1.149 nats
    rb = rollout(policy, [prompt], SamplingParams(max_new_tokens=2, n=3000, seed=0),
                 eos_token_id=eos, pad_token_id=pad, batch_size=3000)
    # the rollout keeps the eos a completion ended on: it was sampled, so it is scored
    examples = [{"prompt_ids": prompt, "completion_ids": c, "label": True} for c in rb.completion_ids]
    logps = sequence_logprobs(policy, examples, pad, batch_size=512)
    est = mc_kl(logps, sequence_logprobs(ref, examples, pad, batch_size=512))
    assert abs(est.mean - exact) < 4 * est.stderr, (est, exact)
    assert mc_kl(logps, logps).mean == 0.0


def test_best_of_n_keeps_the_highest_reward_of_each_group(tiny_world):
    from alignlab.models.loading import load_model, load_tokenizer

    model, tok = load_model(str(tiny_world.base_dir)).eval(), load_tokenizer(str(tiny_world.base_dir))
    prompts = tiny_world.task("positive").eval_prompts[:3]

    def length(ps, cs):
        return [float(len(c.split())) for c in cs]

    picks, scores = best_of_n_sample(model, tok, prompts, n=4, reward=length, samples_per_prompt=2,
                                     max_new_tokens=12, seed=3)
    every = sample(model, tok, prompts, n=8, max_new_tokens=12, seed=3)  # the same draws
    groups = [every.completions[i:i + 4] for i in range(0, 24, 4)]
    assert picks.prompts == [p for p in prompts for _ in range(2)]
    assert scores == [max(length(None, g)) for g in groups]
    assert all(c in g for c, g in zip(picks.completions, groups))


def test_spearman_by_hand():
    from alignlab.eval.ranking import average_ranks, spearman

    assert average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # no ties: 1 − 6Σd²/(n(n²−1)); ranks (1,2,3,4) vs (2,1,4,3): Σd² = 4 → 1 − 24/60 = 0.6
    assert spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    assert math.isnan(spearman([1, 2], [3, 3]))
