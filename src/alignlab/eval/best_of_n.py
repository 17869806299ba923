"""Best-of-n (reward-guided decoding) as an evaluation-time algorithm: sample ``n`` completions
per query from a policy, keep the one a reward scores highest (Stiennon et al. 2020; Nakano et
al. 2021, WebGPT; Gao et al. 2023 use it to measure reward over-optimisation, since its KL to
the policy is ``log n − (n − 1)/n``, ``eval/kl.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from alignlab.rollout.sampling import Samples, sample

Reward = Callable[[list[str], list[str]], Sequence[float]]


def best_of_n_sample(model, tokenizer, prompts: list[str], *, n: int, reward: Reward,
                     samples_per_prompt: int = 1, max_new_tokens: int = 32,
                     temperature: float = 1.0, batch_size: int = 64, seed: int = 0
                     ) -> tuple[Samples, list[float]]:
    """``samples_per_prompt`` best-of-n draws per prompt (prompts repeated in place like
    ``sample``) and the selecting reward of each pick; a tie goes to the first sample drawn."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    k = samples_per_prompt
    s = sample(model, tokenizer, prompts, n=n * k, max_new_tokens=max_new_tokens,
               temperature=temperature, batch_size=batch_size, seed=seed)
    scores = [float(r) for r in reward(s.prompts, s.completions)]
    picks = []
    for start in range(0, len(scores), n):
        picks.append(max(range(start, start + n), key=lambda i: (scores[i], -i)))
    pick = Samples([s.prompts[i] for i in picks], [s.completions[i] for i in picks],
                   [s.completion_ids[i] for i in picks], [s.finish_reasons[i] for i in picks],
                   [s.logprobs[i] for i in picks] if s.logprobs else [],
                   sum(s.finish_reasons[i] == "length" for i in picks) / len(picks))
    return pick, [scores[i] for i in picks]
