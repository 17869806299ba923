"""The rollout role behind one narrow interface, so an RL controller never knows who samples.

``RolloutBackend.generate(prompts_token_ids, params) -> RolloutBatch`` and
``sync_weights(model)`` (called by the trainer after each optimizer step). ``BuiltinBackend``
runs ``alignlab.rollout.engine.rollout`` on the training model itself; ``VLLMBackend`` serves the
same calls from a vLLM engine on GPUs (optional extra: ``pip install 'alignlab[vllm]'``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from alignlab.core.errors import ConfigError
from alignlab.rollout.engine import RolloutBatch, SamplingParams, length_limit_fraction, rollout


@runtime_checkable
class RolloutBackend(Protocol):
    def generate(self, prompts_token_ids: list[list[int]], params: SamplingParams) -> RolloutBatch: ...

    def sync_weights(self, model: nn.Module) -> None: ...


class BuiltinBackend:
    """Samples with the trainer's own model: ``sync_weights`` only re-points at it (no copy)."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, batch_size: int = 256) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)

    def generate(self, prompts_token_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        return rollout(self.model, prompts_token_ids, params, eos_token_id=self.eos_token_id,
                       pad_token_id=self.pad_token_id, tokenizer=self.tokenizer,
                       batch_size=self.batch_size)

    def sync_weights(self, model: nn.Module) -> None:
        self.model = model


class VLLMBackend:
    """vLLM's offline ``LLM`` engine (Kwon et al. 2023, PagedAttention) behind the same calls.

    NOT TESTED in alignlab's CI (no GPU, vllm not installed); written against vLLM's documented
    API: ``LLM.generate([{"prompt_token_ids": ids}, ...], SamplingParams(n=..., logprobs=0))``
    where ``logprobs=0`` returns the sampled token's log-prob. Caveat: by default vLLM reports
    log-probs of the raw (untempered) distribution, while ``BuiltinBackend`` reports them after
    temperature; ``LLM(..., logprobs_mode="processed_logprobs")`` (vLLM >= 0.10.2) gets closer.
    RL trainers should recompute old log-probs with ``token_logprobs`` when they need exactness.
    """

    def __init__(self, model_path: str, tokenizer: Any, **llm_kwargs: Any) -> None:
        try:
            import vllm
        except ImportError as err:
            raise ConfigError("rollout backend 'vllm' needs vLLM, which is not installed: "
                              "pip install 'alignlab[vllm]' (or use backend 'builtin')") from err
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.llm = vllm.LLM(model=model_path, **llm_kwargs)

    def generate(self, prompts_token_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        sp = self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, min_p=params.min_p,
            max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None, seed=params.seed, logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts_token_ids], sp,
                                 use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        comp, logps, reasons, texts = [], [], [], []
        for out in outs:
            for c in out.outputs:
                ids = list(c.token_ids)
                comp.append(ids)
                logps.append([lp[t].logprob for lp, t in zip(c.logprobs or [], ids)])
                reasons.append("length" if c.finish_reason == "length"
                               else "eos" if ids and ids[-1] == eos else "stop")
                texts.append(c.text)
        width = max(1, max(len(c) for c in comp))
        logprobs = torch.zeros(len(comp), width)
        mask = torch.zeros(len(comp), width, dtype=torch.long)
        for i, lp in enumerate(logps):
            logprobs[i, :len(lp)] = torch.tensor(lp)
            mask[i, :len(comp[i])] = 1
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        return RolloutBatch([p for p in prompts_token_ids for _ in range(params.n)], comp, logprobs,
                            mask, reasons, texts,
                            [i for i in range(len(prompts_token_ids)) for _ in range(params.n)], pad,
                            {"frac_hit_length_limit": length_limit_fraction(reasons)})

    def sync_weights(self, model: nn.Module) -> None:
        """Load the trainer's weights into the vLLM worker (single-process engine; version-dependent)."""
        worker_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        worker_model.load_weights(model.state_dict().items())


__all__ = ["RolloutBackend", "BuiltinBackend", "VLLMBackend"]
