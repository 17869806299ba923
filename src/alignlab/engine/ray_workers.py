"""The actors of Ray placement (``ray_placement.py``) as plain classes: the driver wraps them
with ``ray.remote``; nothing here imports Ray, so a test can also run them in its own process.

- ``RolloutWorker`` holds a copy of the policy, built by the trainer's own loader (same path,
  dtype, LoRA settings and seed) and then overwritten by ``load_weights`` before it samples.
  ``generate`` samples a contiguous share of an iteration's prompts with the built-in engine;
  each decode chunk is seeded by the index of its first prompt in the whole batch
  (``rollout.engine.chunk_seed``), so the shares of N workers are what one process samples.
- ``RoleHost`` builds the roles that score (the reward role, pairwise judges) from factories
  and calls their methods: verl's reward worker, OpenRLHF's reward-model actor.

Each actor builds its parts in ``build`` rather than ``__init__``: an error there (a bad model
path, an unknown reward) then comes back to the driver as that error, not as a dead actor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from alignlab.core.runtime import pick_device
from alignlab.rollout.engine import SamplingParams, rollout


def apply_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (a whole state dict, or some of its entries: the trained parameters) into
    ``model`` in place; a name the model lacks is an error, never silently skipped."""
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise KeyError(f"weights the rollout worker's policy lacks: {unknown[:5]} "
                       f"({len(unknown)} in all); is it built like the trainer's?")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def _quiet(threads: int) -> None:
    """One actor process: its own thread count, no progress bars or tokenizer threads."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, threads))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


class RolloutWorker:
    """A copy of the policy that samples (see the module docstring)."""

    def __init__(self, threads: int = 1) -> None:
        _quiet(threads)
        self.model: torch.nn.Module | None = None
        self.loads = 0

    def build(self, policy_factory: Callable[[], Any], *, eos_token_id: int | list[int] | None,
              pad_token_id: int, batch_size: int, device: str) -> None:
        model = policy_factory()
        model = model[0] if isinstance(model, tuple) else model  # (model, tokenizer) loaders
        # requires_grad stays as the loader set it, as on the trainer's policy: CPU kernels
        # differ with it (measured: sampler log-probs 5e-7 apart), even under inference_mode.
        self.model = model.to(pick_device(device)).eval()
        self.eos, self.pad, self.batch_size = eos_token_id, pad_token_id, batch_size

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> int:
        """Overwrite the named weights; returns how many loads this worker has taken."""
        apply_weights(self._policy(), state)
        self.loads += 1
        return self.loads

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams
                 ) -> tuple[list[list[int]], list[str], list[list[float]]]:
        """``(completion ids with their ending token, finish reasons, sampler log-probs)`` of
        ``params.n`` samples of each prompt; ``params.first_prompt`` is the index of
        ``prompt_ids[0]`` in the iteration's batch (it seeds the chunks)."""
        rb = rollout(self._policy(), prompt_ids, params, eos_token_id=self.eos,
                     pad_token_id=self.pad, batch_size=self.batch_size, warn_length=False)
        logprobs = [rb.logprobs[i, :len(c)].tolist() for i, c in enumerate(rb.completion_ids)]
        return rb.completion_ids, rb.finish_reasons, logprobs

    def weights(self) -> dict[str, torch.Tensor]:
        """The policy's whole state dict, on the CPU (for tests and checks)."""
        return {k: v.detach().cpu().clone() for k, v in self._policy().state_dict().items()}

    def _policy(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("RolloutWorker.build was not called")
        return self.model


class RoleHost:
    """Roles built from factories, by key, and their methods called by name."""

    def __init__(self, threads: int = 1) -> None:
        _quiet(threads)
        self.roles: dict[str, Any] = {}

    def build(self, key: str, factory: Callable[[], Any]) -> None:
        self.roles[key] = factory()

    def call(self, key: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``roles[key].method(*args, **kwargs)``."""
        return getattr(self.roles[key], method)(*args, **kwargs)

    def methods(self, key: str, names: tuple[str, ...]) -> list[str]:
        """Which of ``names`` the role has."""
        return [n for n in names if callable(getattr(self.roles[key], n, None))]


__all__ = ["RoleHost", "RolloutWorker", "apply_weights"]
