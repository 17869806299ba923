"""KL(π‖π_ref) of a policy's completions, for evaluation.

Monte-Carlo estimator (the k1 estimator at the sequence level): with ``y_i ~ π(·|x_i)`` sampled
at temperature 1 and untruncated,
``KL̂ = (1/N) Σ_i [log π(y_i|x_i) − log π_ref(y_i|x_i)]``, each log-prob the sum over the
completion's tokens (its eos included when it ended on one). It is unbiased for the mean over
prompts of the sequence-level KL; its standard error is the sample std of the differences / √N.
Single estimates can be negative.

Best-of-n has no tractable log π; its KL to the sampling policy is reported by the analytic
formula ``log n − (n − 1)/n`` (Stiennon et al. 2020; Gao et al. 2023, "Scaling Laws for Reward
Model Overoptimization"), exact for distinct samples and an upper bound otherwise (Beirami et al.
2024).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignlab.algorithms.preference.reference import compute_reference_logps


@dataclass(frozen=True)
class KLEstimate:
    mean: float
    stderr: float
    n: int


def mc_kl(logps: Sequence[float], ref_logps: Sequence[float]) -> KLEstimate:
    """``mean(log π(y) − log π_ref(y))`` over samples ``y ~ π``, with its standard error."""
    if len(logps) != len(ref_logps) or not logps:
        raise ValueError(f"mc_kl needs equal, non-empty lists; got {len(logps)} and {len(ref_logps)}")
    diffs = [float(a) - float(b) for a, b in zip(logps, ref_logps)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return KLEstimate(statistics.fmean(diffs), se, len(diffs))


def best_of_n_kl(n: int) -> float:
    """``log n − (n − 1)/n``: KL(best-of-n ‖ the policy it samples from)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def completion_examples(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                        finish_reasons: Sequence[str], eos_token_id: int | None
                        ) -> list[dict[str, Any]]:
    """One scoring example per sample: the prompt's ids and the completion's, with the eos the
    sampler stopped on (the ``sample`` helper strips it; it was sampled, so it is scored)."""
    return [{"prompt_ids": list(p),
             "completion_ids": list(c) + ([eos_token_id] if why == "eos" and eos_token_id is not None else []),
             "label": True}
            for p, c, why in zip(prompt_ids, completion_ids, finish_reasons)]


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, examples: list[dict[str, Any]], pad_token_id: int, *,
                      batch_size: int = 64) -> list[float]:
    """``log model(y|x)`` (the sum over the completion's tokens) of every example. An example
    with an empty completion (no token at all) scores 0."""
    keep = [i for i, e in enumerate(examples) if e["completion_ids"]]
    out = [0.0] * len(examples)
    if keep:
        device = next(model.parameters()).device
        values = compute_reference_logps(model, [examples[i] for i in keep], pad_token_id,
                                         batch_size=batch_size, device=device, layout="flat")
        for i, v in zip(keep, values):
            out[i] = float(v[0])
    return out
