"""Evaluate a policy against a reference policy on a task's held-out prompts: the metrics of
``alignlab bench`` (issue 13), one dict per policy.

On ``N = prompts × samples_per_prompt`` samples at temperature 1 (untruncated, so that they are
draws of π and the KL estimate is unbiased):

- ``gold_mean``/``gold_std``: the task's gold reward; ``proxy_mean``: the proxy reward (a reward
  model) when given; ``ref_gold_mean``: the reference's own samples' gold;
- ``kl_to_ref``: KL(π‖π_ref), Monte-Carlo ``mean(log π(y) − log π_ref(y))`` (``eval/kl.py``,
  the result's ``kl_estimator: mc_k1``, with ``kl_stderr``), or for best-of-n the analytic
  ``log n − (n−1)/n`` (``kl_estimator: best_of_n_analytic``);
- ``win_rate_gold``: ``mean σ(g(y) − g(y_ref))`` paired per prompt; ``win_rate_annotator``: the
  simulated annotator's preference share (ties ½) on the same pairs (``eval/win_rate.py``);
- ``length_tokens``, ``length_words``, ``hit_length_limit``, ``distinct_1``, ``distinct_2``,
  ``self_bleu`` (``eval/diversity.py``);
- ``ppl_base``: ``exp(−Σ log p_base(y|x) / Σ |y|)``, the completions' perplexity under the base
  model (tokens include the eos a completion stopped on; empty completions are left out);
- ``pass_at_k`` for each k on verifiable tasks (gold 1 = correct; ``eval/passk.py``).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from alignlab.eval.best_of_n import best_of_n_sample
from alignlab.eval.diversity import distinct_n, self_bleu
from alignlab.eval.kl import best_of_n_kl, completion_examples, mc_kl, sequence_logprobs
from alignlab.eval.passk import mean_pass_at_k
from alignlab.eval.win_rate import annotator_win_rate, bradley_terry_win_rate
from alignlab.rewards.annotator import SimulatedAnnotator
from alignlab.rollout.sampling import Samples, sample

Reward = Callable[[list[str], list[str]], Sequence[float]]


def _examples(tokenizer, s: Samples) -> list[dict[str, Any]]:
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in s.prompts]
    return completion_examples(prompt_ids, s.completion_ids, s.finish_reasons, tokenizer.eos_token_id)


@torch.no_grad()
def evaluate_against_reference(
        policy: torch.nn.Module, tokenizer: Any, task: Any, prompts: list[str], *,
        reference: torch.nn.Module, base: torch.nn.Module | None = None,
        samples_per_prompt: int = 4, max_new_tokens: int | None = None, batch_size: int = 64,
        seed: int = 0, proxy: Reward | None = None, annotator: SimulatedAnnotator | None = None,
        pass_ks: Sequence[int] = (), best_of_n: int | None = None,
        best_of_n_reward: Reward | None = None, self_bleu_max_texts: int = 256,
        n_examples: int = 6) -> dict[str, Any]:
    """The metrics of the module docstring for ``policy`` (for best-of-n: the policy it samples
    from, with ``best_of_n`` and the selecting ``best_of_n_reward``) against ``reference``.
    ``base`` (for ``ppl_base``) defaults to the reference."""
    k = samples_per_prompt
    max_new = max_new_tokens or task.max_new_tokens
    common = dict(max_new_tokens=max_new, batch_size=batch_size)
    if best_of_n is not None:
        if best_of_n_reward is None:
            raise ValueError("best-of-n needs the reward that picks the best sample")
        s, _ = best_of_n_sample(policy, tokenizer, prompts, n=best_of_n, reward=best_of_n_reward,
                                samples_per_prompt=k, seed=seed, **common)
    else:
        s = sample(policy, tokenizer, prompts, n=k, seed=seed, **common)
    # The reference's samples: independent draws (another seed) on the same prompts.
    ref = sample(reference, tokenizer, prompts, n=k, seed=seed + 1, **common)
    gold = [float(g) for g in task.gold(s.prompts, s.completions)]
    ref_gold = [float(g) for g in task.gold(ref.prompts, ref.completions)]
    m: dict[str, Any] = {"gold_mean": statistics.fmean(gold), "gold_std": statistics.pstdev(gold),
                         "ref_gold_mean": statistics.fmean(ref_gold)}
    if proxy is not None:
        m["proxy_mean"] = statistics.fmean(float(r) for r in proxy(s.prompts, s.completions))
    examples = _examples(tokenizer, s)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ref_logps = sequence_logprobs(reference, examples, pad, batch_size=batch_size)
    if best_of_n is not None:
        m.update(kl_to_ref=best_of_n_kl(best_of_n), kl_stderr=0.0)
        estimator = "best_of_n_analytic"
    else:
        est = mc_kl(sequence_logprobs(policy, examples, pad, batch_size=batch_size), ref_logps)
        m.update(kl_to_ref=est.mean, kl_stderr=est.stderr)
        estimator = "mc_k1"
    m["win_rate_gold"] = bradley_terry_win_rate(gold, ref_gold)
    if annotator is not None:
        m["win_rate_annotator"] = annotator_win_rate(annotator, s.prompts, s.completions, ref.completions)
    m["length_tokens"] = statistics.fmean(len(e["completion_ids"]) for e in examples)
    m["length_words"] = statistics.fmean(len(c.split()) for c in s.completions)
    m["hit_length_limit"] = sum(r == "length" for r in s.finish_reasons) / len(s.finish_reasons)
    m["distinct_1"] = distinct_n(s.completions, 1)
    m["distinct_2"] = distinct_n(s.completions, 2)
    texts = s.completions
    if len(texts) > self_bleu_max_texts:  # O(N) but still the slowest metric; a seeded subset
        texts = random.Random(seed).sample(texts, self_bleu_max_texts)
    m["self_bleu"] = self_bleu(texts)
    base_logps = ref_logps if base is None or base is reference else sequence_logprobs(
        base, examples, pad, batch_size=batch_size)
    tokens = sum(len(e["completion_ids"]) for e in examples)
    m["ppl_base"] = math.exp(-sum(base_logps) / tokens) if tokens else math.nan
    for kk in pass_ks:
        if kk > k:
            raise ValueError(f"pass@{kk} needs at least {kk} samples per prompt, got {k}")
        m[f"pass_at_{kk}"] = mean_pass_at_k([[g >= 1.0 for g in gold[i:i + k]]
                                             for i in range(0, len(gold), k)], kk)
    return {"task": task.name, "n_prompts": len(prompts), "n_samples": len(gold),
            "kl_estimator": estimator, "metrics": m,
            "examples": [{"prompt": p, "completion": c, "gold": g}
                         for p, c, g in list(zip(s.prompts, s.completions, gold))[:n_examples]]}
