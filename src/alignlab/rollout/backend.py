"""The rollout backend protocol: what samples completions for the rollout role.

A backend turns token-id prompts and ``SamplingParams`` into completions with the sampler's
own log-probs, and takes the policy's weights when the trainer has changed them:

- ``generate(prompt_ids, params) -> Generation``: ``params.n`` samples per prompt, ordered
  p0, p0, ..., p1, p1, ...; each completion's ids *include* the token that ended it (an eos or
  stop id, as sampled), with the log-prob of every id under the sampling distribution (after
  temperature, before top-k/top-p truncation: ``rollout/engine.py``);
- ``sync_weights(policy)``: make the sampler's weights equal the policy module's now (the
  caller guarantees that no update runs meanwhile).

Two implementations: ``BuiltinBackend`` (alignlab's engine on the policy module itself, or on a
copy for asynchronous sampling) and ``rollout/vllm_backend.py: VLLMBackend`` (vLLM, weights
overwritten from the trainer: the whole merged state, or LoRA adapters alone). verl/HybridFlow
(Sheng et al. 2024) draws the same line between a rollout worker and the trainer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from alignlab.core.errors import ConfigError
from alignlab.rollout.engine import LogitsProcessor, SamplingParams, rollout


@dataclass
class Generation:
    """``N = len(prompts) * n`` samples of one ``generate`` call, ordered p0, p0, ..., p1, ..."""

    completion_ids: list[list[int]]
    """Sampled ids, the ending eos/stop id included."""
    finish_reasons: list[str]
    """``eos`` | ``stop`` (a stop id) | ``length`` (``max_new_tokens`` reached)."""
    logprobs: list[list[float]]
    """log π_sampler(y_t | ·) of every id in ``completion_ids``."""


@runtime_checkable
class RolloutBackend(Protocol):
    """What the rollout role samples with (see the module docstring)."""

    name: str

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        """``params.n`` completions of every prompt."""

    def sync_weights(self, policy: nn.Module) -> None:
        """Sample from ``policy``'s current weights from now on."""


class BuiltinBackend:
    """The built-in engine (``rollout/engine.py``) on a policy module.

    ``own_copy=False``: it samples from the trained module itself, so there is nothing to sync.
    ``own_copy=True``: from a copy that only ``sync_weights`` changes, which the trainer may
    update meanwhile (asynchronous RL). The copy shares the frozen parameters (under LoRA the
    whole base model) and a sync copies the trained ones only (under LoRA: the adapters).
    """

    name = "builtin"

    def __init__(self, model: nn.Module, *, eos_token_id: int | list[int] | None,
                 pad_token_id: int, tokenizer: Any = None, batch_size: int = 64,
                 logits_processor: Callable[[], LogitsProcessor | None] | None = None,
                 own_copy: bool = False) -> None:
        self.eos, self.pad, self.tokenizer = eos_token_id, pad_token_id, tokenizer
        self.batch_size, self._logits_processor = batch_size, logits_processor
        self.own_copy = own_copy
        if own_copy:
            # requires_grad is kept as it is: on CPU, torch runs a frozen linear layer with
            # other kernels (log-probs 1e-6 apart), and the copy must sample as the policy does.
            frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
            model = copy.deepcopy(model, memo=frozen).eval()
        self.model = model

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        processor = self._logits_processor() if self._logits_processor is not None else None
        # The caller warns (once per run) from the finish reasons; texts are the role's job.
        rb = rollout(self.model, prompt_ids, params, eos_token_id=self.eos,
                     pad_token_id=self.pad, tokenizer=self.tokenizer if params.stop else None,
                     batch_size=self.batch_size, logits_processor=processor, warn_length=False)
        logprobs = [rb.logprobs[i, :len(c)].tolist() for i, c in enumerate(rb.completion_ids)]
        return Generation(rb.completion_ids, rb.finish_reasons, logprobs)

    @torch.no_grad()
    def sync_weights(self, policy: nn.Module) -> None:
        if not self.own_copy:
            if policy is not self.model:
                raise ValueError("a builtin backend without its own copy samples from its "
                                 "policy module itself; it cannot take another module's weights")
            return
        mine = dict(self.model.named_parameters())
        for name, p in policy.named_parameters():
            if p.requires_grad:
                mine[name].copy_(p.detach())


def builtin_only(backend: str, trainer: str) -> None:
    """ConfigError unless ``rollout.backend`` is ``builtin`` (trainers not wired to vLLM yet)."""
    if backend != "builtin":
        raise ConfigError(f"field 'rollout.backend': {backend!r} is wired into the "
                          f"policy-gradient trainers (grpo, rloo, remax, reinforce_pp, ppo, "
                          f"nlpo); {trainer} samples with 'builtin'")


__all__ = ["Generation", "RolloutBackend", "BuiltinBackend", "builtin_only"]
