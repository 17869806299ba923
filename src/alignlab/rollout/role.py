"""The rollout role of online training: sample completions of prompts from the current policy and
turn them into token batches for the learner.

verl/HybridFlow's split (Sheng et al. 2024): the online controller only passes plain data
between roles (prompts → ``Rollouts`` → scores → batches → metrics), so a role can later live
on its own worker without touching an algorithm. The sampling itself is a backend
(``rollout/backend.py``): the built-in engine on the policy's own module (the default; nothing
to sync), on a copy of it, or vLLM (``rollout/vllm_backend.py``), each synced by
``sync_weights`` before it samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alignlab.core.config import RolloutSection
from alignlab.core.errors import ConfigError
from alignlab.data.collate import completion_rows
from alignlab.rollout.backend import BuiltinBackend, RolloutBackend
from alignlab.rollout.engine import LogitsProcessor, SamplingParams


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

    The backend's own token ids go to training unchanged (no decode/re-encode round trip, which
    costs time and need not reproduce the sampled ids)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
                 logits_processor: Callable[[], LogitsProcessor | None] | None = None,
                 backend: RolloutBackend | None = None,
                 precision: Literal["fp32", "bf16"] = "fp32") -> None:
        self.model, self.tokenizer = model, tokenizer
        self.precision = precision
        """The sampler's forward precision (``SamplingParams.precision``): the trainer's."""
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.backend = backend or BuiltinBackend(
            model, eos_token_id=self.eos, pad_token_id=self.pad, tokenizer=tokenizer,
            batch_size=batch_size, logits_processor=logits_processor)
        self._prompt_ids: dict[str, list[int]] = {}
        self.prompt_offset = 0
        """The index of the first prompt given to ``generate`` in the iteration's whole batch
        (set by the controller; nonzero on a rank's share): samples are seeded by it."""

    def sync_weights(self, policy: torch.nn.Module | None = None) -> None:
        """Make the backend sample from ``policy``'s (default: the trained model's) weights now;
        nothing to do when it samples from the trained module itself."""
        self.backend.sync_weights(self.model if policy is None else policy)

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._prompt_ids]
        if todo:
            ids = self.tokenizer(todo, add_special_tokens=False)["input_ids"]
            self._prompt_ids.update(zip(todo, ids))
        return [self._prompt_ids[p] for p in prompts]

    def generate(self, prompts: list[str], n: int, *, seed: int,
                 greedy: bool = False) -> Rollouts:
        params = SamplingParams(temperature=0.0 if greedy else self.temperature, top_p=self.top_p,
                                max_new_tokens=self.max_new_tokens, n=n, seed=seed,
                                first_prompt=self.prompt_offset, precision=self.precision)
        ids = self._encode(prompts)
        gen = self.backend.generate(ids, params)
        comp = [c[:-1] if why == "eos" else list(c)
                for c, why in zip(gen.completion_ids, gen.finish_reasons)]
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in gen.completion_ids]
        index = [i for i in range(len(prompts)) for _ in range(n)]
        return Rollouts([prompts[i] for i in index], texts, comp, gen.finish_reasons, index,
                        [ids[i] for i in index], gen.logprobs)

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


def make_backend(section: RolloutSection, policy: torch.nn.Module, tokenizer: Any, *,
                 own_copy: bool = False, train_precision: str = "fp32",
                 work_dir: str | Path | None = None,
                 logits_processor: Callable[[], LogitsProcessor | None] | None = None
                 ) -> RolloutBackend:
    """The backend ``rollout.backend`` names for ``policy``: the built-in engine (on the policy
    itself, or with ``own_copy`` on a copy only ``sync_weights`` changes) or vLLM (always its
    own weights; ``rollout.vllm``)."""
    eos = tokenizer.eos_token_id
    if section.backend == "vllm":
        if logits_processor is not None:
            raise ConfigError("field 'rollout.backend': 'vllm' samples without alignlab's "
                              "logits processors (NLPO's action mask); use 'builtin'")
        from alignlab.rollout.vllm_backend import VLLMBackend

        return VLLMBackend(policy, section.vllm, eos_token_id=eos,
                           train_precision=train_precision, work_dir=work_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    return BuiltinBackend(policy, eos_token_id=eos, pad_token_id=pad, tokenizer=tokenizer,
                          batch_size=section.batch_size, logits_processor=logits_processor,
                          own_copy=own_copy)
