"""``alignlab eval --prompts``: sample on the user's own prompts, score with the user's reward.

Prompts are ``prompt_only`` rows (a JSONL/Parquet file, a ``datasets`` folder, or
``world:<task>`` for a task's eval prompts); a prompt given as a list of messages is rendered
with the tokenizer's chat template, and a row's extra columns reach the reward functions as
fields — both exactly as in online RL training (``algorithms/common.py``,
``policy_gradient/algorithm.py: judge``), so a reward scores the same here as in training.

With a reference model the report adds a Monte-Carlo estimate of the sequence-level
KL(π ‖ π_ref) on the sampled completions y ~ π(·|x) (eos included, cut at ``max_new_tokens``):

- ``kl_ref``    = mean over samples of Σ_t [log π(y_t|x,y_<t) − log π_ref(y_t|x,y_<t)]
  (k1; unbiased, can be negative on one sample);
- ``kl_ref_k3`` = mean over samples of Σ_t [r_t − 1 − log r_t], r_t = π_ref(y_t|·)/π(y_t|·)
  (k3; unbiased by the chain rule, ≥ 0, lower variance; Schulman 2020, ``losses/kl.py``);

both with log-probs of the sampling temperature T (π ∝ softmax(z/T) for both models, as the
RL trainers' KL term), recomputed by one forward pass of each model. ``kl_ref_se`` is the
standard error of ``kl_ref``. The estimate is of the untruncated policy: with top-k/top-p/min-p
the samples do not come from π and it is biased (a warning says so); greedy decoding (T = 0)
gives no samples of π and is refused.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignlab.algorithms.common import load_policy, render_chat_prompts
from alignlab.core.config import ModelSection, WorldSection
from alignlab.core.errors import ConfigError
from alignlab.data.collate import completion_rows
from alignlab.data.loading import load_rows
from alignlab.engine.prompts import PromptSource
from alignlab.eval.diversity import distinct_n
from alignlab.losses.kl import token_kl
from alignlab.models.loading import freeze
from alignlab.models.logprobs import token_logprobs
from alignlab.rewards.scoring import RewardRole
from alignlab.rollout.engine import SamplingParams
from alignlab.rollout.sampling import Samples, sample
from alignlab.world.resolve import is_world, world_task

KL_ESTIMATOR = ("sequence-level KL(pi || pi_ref) on y ~ pi at the sampling temperature: "
                "kl_ref = mean of sum_t (log pi - log pi_ref) (k1), kl_ref_k3 = mean of "
                "sum_t (r - 1 - log r), r = pi_ref/pi (k3); eos included")


@dataclass
class PromptRows:
    """Prompt rows as given (``prompt`` a string or a list of messages, extra columns kept)."""

    rows: list[dict[str, Any]]
    source: str
    task: Any = None
    """The world task of ``world:<task>`` (its ``gold`` reward and ``max_new_tokens``), else None."""


def read_prompt_rows(source: str, world: WorldSection, *, limit: int | None = None,
                     field: str = "--prompts") -> PromptRows:
    """``prompt_only`` rows from a file or folder (validated: a bad row is a ``DataError``
    naming file:line:field), or ``world:<task>``'s eval prompts; the first ``limit`` rows."""
    if is_world(source):
        task = world_task(source, world, field)
        return PromptRows([{"prompt": p} for p in task.eval_prompts[:limit]], source, task)
    rows = load_rows(source, format="prompt_only", limit=limit)
    return PromptRows([dict(r) for r in rows], rows.source)


def prompt_texts(rows: Sequence[dict[str, Any]], tokenizer: Any, field: str = "--prompts") -> list[str]:
    """The text the model continues for each row: a string prompt as is, a list of messages
    through the chat template with the generation prompt (what the RL trainers sample on)."""
    source = PromptSource([dict(r) for r in rows], seed=0)
    render_chat_prompts(source, tokenizer, field)
    return [r["prompt"] for r in source.rows]


def load_reference(name_or_path: str, tokenizer: Any, world: WorldSection,
                   device: torch.device | str = "cpu") -> torch.nn.Module:
    """The frozen reference π_ref; its tokenizer must be the policy's (same ids, same tokens),
    or per-token log-prob differences compare different events."""
    reference, ref_tokenizer = load_policy(ModelSection(name_or_path=name_or_path), world)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"--reference: {name_or_path}'s tokenizer differs from the policy's; "
                          "a KL needs both models over the same vocabulary")
    return freeze(reference).to(device)


def _check_kl_sampling(params: SamplingParams) -> None:
    if params.temperature <= 0:
        raise ConfigError("--reference: a Monte-Carlo KL needs samples from the policy; greedy "
                          "decoding (temperature 0) gives none: set a temperature > 0")
    if params.top_k or params.top_p < 1 or params.min_p:
        warnings.warn("--reference: top-k/top-p/min-p truncate the policy, so the samples are "
                      "not from π and the KL estimate is biased", stacklevel=3)


@torch.no_grad()
def kl_to_reference(model: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any,
                    prompts: Sequence[str], samples: Samples, *, temperature: float,
                    batch_size: int = 32) -> tuple[list[float], list[float]]:
    """Per-sample ``(k1, k3)`` sums over each completion's tokens (the eos that ended it
    included), log-probs at ``temperature`` from both models (see the module docstring)."""
    _check_kl_sampling(SamplingParams(temperature=temperature))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    k1, k3 = [], []
    for lo in range(0, len(prompts), batch_size):
        rows, starts = [], []
        for i in range(lo, min(lo + batch_size, len(prompts))):
            prompt = tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
            ended = [eos] if samples.finish_reasons[i] == "eos" else []
            rows.append(prompt + samples.completion_ids[i] + ended)
            starts.append(len(prompt))
        batch = {k: v.to(device) for k, v in completion_rows(rows, starts, pad).items()}
        logprobs = token_logprobs(model, batch, temperature=temperature)
        ref_logprobs = token_logprobs(reference, batch, temperature=temperature)
        mask = batch["loss_mask"]
        k1 += token_kl(logprobs, ref_logprobs, "k1", mask).sum(-1).tolist()
        k3 += token_kl(logprobs, ref_logprobs, "k3", mask).sum(-1).tolist()
    return k1, k3


def evaluate_user(model: torch.nn.Module, tokenizer: Any, prompts: PromptRows,
                  rewards: RewardRole, params: SamplingParams, *,
                  reference: torch.nn.Module | None = None, batch_size: int = 64,
                  n_examples: int = 8) -> dict[str, Any]:
    """Sample ``params.n`` completions per prompt; report the reward (total and per component),
    length, distinct-n, the fraction cut at ``max_new_tokens`` and, with ``reference``, the KL.

    The result has the shape of ``evaluate.evaluate``'s (``write_report`` writes it)."""
    if reference is not None:
        _check_kl_sampling(params)
    texts = prompt_texts(prompts.rows, tokenizer)
    s = sample(model, tokenizer, texts, n=params.n, max_new_tokens=params.max_new_tokens,
               temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
               min_p=params.min_p, stop=params.stop, batch_size=batch_size, seed=params.seed)
    index = [i for i in range(len(prompts.rows)) for _ in range(params.n)]
    columns = dict.fromkeys(k for r in prompts.rows for k in r if k != "prompt")
    fields = {k: [prompts.rows[i].get(k) for i in index] for k in columns}
    scored = rewards.score(s.prompts, s.completions, fields, s.completion_ids)
    valid = [v for v, ok in zip(scored.scores, scored.valid) if ok]
    if not valid:
        raise ConfigError(f"every one of the {len(s.completions)} samples failed the reward")
    metrics: dict[str, float] = {"reward_mean": statistics.fmean(valid),
                                 "reward_std": statistics.pstdev(valid)}
    for name, values in scored.components.items():
        metrics[f"reward/{name}"] = statistics.fmean(v for v, ok in zip(values, scored.valid) if ok)
    if scored.skipped:
        metrics["reward_skipped"] = float(scored.skipped)
    metrics.update(scored.metrics)
    metrics["length_tokens"] = statistics.fmean(len(c) for c in s.completion_ids)
    metrics["length_words"] = statistics.fmean(len(c.split()) for c in s.completions)
    metrics["hit_length_limit"] = s.finish_reasons.count("length") / len(s.finish_reasons)
    metrics["distinct_1"] = distinct_n(s.completions, 1)
    metrics["distinct_2"] = distinct_n(s.completions, 2)
    config: dict[str, Any] = {"sampling": vars(params).copy(),
                              "reward": {name: w for name, (w, _) in rewards.components.items()}}
    if reference is not None:
        k1, k3 = kl_to_reference(model, reference, tokenizer, s.prompts, s,
                                 temperature=params.temperature, batch_size=batch_size)
        metrics["kl_ref"] = statistics.fmean(k1)
        metrics["kl_ref_se"] = statistics.stdev(k1) / math.sqrt(len(k1)) if len(k1) > 1 else 0.0
        metrics["kl_ref_k3"] = statistics.fmean(k3)
        config["kl_estimator"] = KL_ESTIMATOR
    examples = [{"prompt": p, "completion": c, "reward": r if ok else None}
                for p, c, r, ok in list(zip(s.prompts, s.completions, scored.scores,
                                            scored.valid))[:n_examples]]
    return {"prompts": prompts.source, "n_samples": len(s.completions), "metrics": metrics,
            "examples": examples, "config": config}


__all__ = ["KL_ESTIMATOR", "PromptRows", "evaluate_user", "kl_to_reference", "load_reference",
           "prompt_texts", "read_prompt_rows"]
