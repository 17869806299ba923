"""The rollout role of online training: sample completions of prompts from the current policy and
turn them into token batches for the learner.

verl/HybridFlow's split (Sheng et al. 2024): the online controller only passes plain data
between roles (prompts → ``Rollouts`` → scores → batches → metrics), so a role can later live
on its own worker (or the sampling on a vLLM server, with ``sync_weights``) without touching an
algorithm. Here the role samples from the policy's own module in the trainer's process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from alignlab.data.collate import completion_rows
from alignlab.rollout.engine import LogitsProcessor, SamplingParams, rollout


@dataclass
class Rollouts:
    prompts: list[str]
    """One per completion (each prompt repeated ``n`` times in place)."""
    completions: list[str]
    completion_ids: list[list[int]]
    """Sampled ids without the eos that ended a completion (``to_batch`` appends it back)."""
    finish_reasons: list[str]
    prompt_index: list[int]
    """Which of the step's prompts each completion answers (the group id)."""
    prompt_ids: list[list[int]] | None = None
    """The prompt's token ids, one list per completion; None: ``to_batch`` tokenizes ``prompts``."""
    logprobs: list[list[float]] | None = None
    """The sampler's log-probs of each completion's tokens (the eos that ended it included)."""


class RolloutRole:
    """Samples completions from the current policy and turns them into token batches.

    The engine's own token ids go to training unchanged (no decode/re-encode round trip, which
    costs time and need not reproduce the sampled ids)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
                 logits_processor: Callable[[], LogitsProcessor | None] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._logits_processor = logits_processor
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self._prompt_ids: dict[str, list[int]] = {}

    def sync_weights(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """In one process the rollout samples from the trained module itself: nothing to copy."""

    def logits_processor(self) -> LogitsProcessor | None:
        """A fresh ``LogitsProcessor`` applied while sampling (NLPO's mask), or None."""
        return self._logits_processor() if self._logits_processor is not None else None

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._prompt_ids]
        if todo:
            ids = self.tokenizer(todo, add_special_tokens=False)["input_ids"]
            self._prompt_ids.update(zip(todo, ids))
        return [self._prompt_ids[p] for p in prompts]

    def generate(self, prompts: list[str], n: int, *, seed: int,
                 greedy: bool = False) -> Rollouts:
        params = SamplingParams(temperature=0.0 if greedy else self.temperature, top_p=self.top_p,
                                max_new_tokens=self.max_new_tokens, n=n, seed=seed)
        ids = self._encode(prompts)
        # The controller warns itself (once per run) from the finish reasons.
        rb = rollout(self.model, ids, params, eos_token_id=self.eos, pad_token_id=self.pad,
                     tokenizer=self.tokenizer, batch_size=self.batch_size,
                     logits_processor=self.logits_processor(), warn_length=False)
        comp = [c[:-1] if why == "eos" else list(c)
                for c, why in zip(rb.completion_ids, rb.finish_reasons)]
        index = [i for i in range(len(prompts)) for _ in range(n)]
        logprobs = [rb.logprobs[i, :len(c)].tolist() for i, c in enumerate(rb.completion_ids)]
        return Rollouts([prompts[i] for i in index], rb.texts, comp, rb.finish_reasons, index,
                        [ids[i] for i in index], logprobs)

    def to_batch(self, r: Rollouts) -> dict[str, torch.Tensor]:
        """Right-padded prompt+completion(+eos when it stopped) ids; ``loss_mask`` on the completion."""
        prompt_ids = r.prompt_ids if r.prompt_ids is not None else self._encode(r.prompts)
        rows, starts = [], []
        for p, ids, why in zip(prompt_ids, r.completion_ids, r.finish_reasons):
            # The eos that ended a completion is an action too: without it the policy never
            # learns to stop.
            rows.append(list(p) + list(ids) + ([self.eos] if why == "eos" else []))
            starts.append(len(p))
        batch = completion_rows(rows, starts, self.pad)
        if r.logprobs is not None:  # the sampler's view of the same tokens, for IS corrections
            batch["rollout_logprobs"] = torch.zeros(batch["loss_mask"].shape)
            for b, (start, lps) in enumerate(zip(starts, r.logprobs)):
                batch["rollout_logprobs"][b, start:start + len(lps)] = torch.tensor(lps)
        return batch
