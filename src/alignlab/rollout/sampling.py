"""Text in, text out sampling for evaluation and data generation, on the rollout engine.

``sample`` tokenizes the prompts (no special tokens), calls ``alignlab.rollout.engine.rollout``
and returns completions without their eos token (the convention of its callers; RL code uses
``rollout`` directly, whose completions keep it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from alignlab.rollout.engine import LogitsProcessor, SamplingParams, rollout


@dataclass
class Samples:
    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    finish_reasons: list[str]
    logprobs: list[list[float]] = field(default_factory=list)
    frac_hit_length_limit: float = 0.0


def sample(model, tokenizer, prompts: list[str], *, n: int = 1, max_new_tokens: int = 32,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
           stop: tuple[str, ...] = (), batch_size: int = 64, seed: int = 0,
           warn_length: bool = False, logits_processor: LogitsProcessor | None = None) -> Samples:
    """Sample ``n`` completions per prompt; prompts are repeated in place (p0, p0, p1, p1, ...).

    The length-limit warning is off by default here: evaluation reports ``hit_length_limit``
    itself, and data generation often cuts on purpose. RL rollouts keep it on.
    """
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            max_new_tokens=max_new_tokens, stop=tuple(stop), n=n, seed=seed)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    with warnings.catch_warnings():
        if not warn_length:
            warnings.filterwarnings("ignore", message=".*cut at max_new_tokens")
        rb = rollout(model, ids, params, eos_token_id=eos, pad_token_id=pad,
                     tokenizer=tokenizer, batch_size=batch_size, logits_processor=logits_processor)
    comp_ids, logps = [], []
    for i, (c, why) in enumerate(zip(rb.completion_ids, rb.finish_reasons)):
        keep = len(c) - 1 if why == "eos" else len(c)
        comp_ids.append(c[:keep])
        logps.append(rb.logprobs[i, :keep].tolist())
    return Samples([p for p in prompts for _ in range(n)], rb.texts, comp_ids, rb.finish_reasons,
                   logps, rb.stats["frac_hit_length_limit"])


__all__ = ["Samples", "sample"]
