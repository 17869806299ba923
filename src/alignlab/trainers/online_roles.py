"""The three roles the online-RL controller drives: rollout, reward, policy (training).

verl/HybridFlow's split (Sheng et al. 2024): the controller only passes plain data between
roles — prompts → ``Rollouts`` → scores → an experience dict of ``[B,T]`` tensors → metrics —
so a later change can place each role on its own Ray worker (or the rollout on a vLLM server,
with ``RolloutRole.sync_weights``) without touching an algorithm. Here all three share one
process and the rollout samples from the policy's own module.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from alignlab.config import TrainSection
from alignlab.losses.policy import POLICY_LOSSES, aggregate, num_items
from alignlab.data.collate import completion_rows
from alignlab.models.checkpointing import enable_gradient_checkpointing
from alignlab.models.shared_tokens import grouped_token_logprobs
from alignlab.rollout.engine import SamplingParams, rollout
from alignlab.trainers.loop import (LossOutput, build_optimizer, build_scheduler, forward_backward,
                                    optimizer_step, to_device)
from alignlab.utils.runtime import pick_device, resolve_precision

# ---------------------------------------------------------------------------------- rollout


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


class RolloutRole:
    """Samples completions from the current policy and turns them into token batches.

    The engine's own token ids go to training unchanged (no decode/re-encode round trip, which
    costs time and need not reproduce the sampled ids)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self._prompt_ids: dict[str, list[int]] = {}

    def sync_weights(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """In one process the rollout samples from the trained module itself: nothing to copy."""

    def logits_processor(self) -> Any:
        """A ``rollout.engine.LogitsProcessor`` applied while sampling (NLPO's mask); None here."""
        return None

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
        with warnings.catch_warnings():  # the controller warns itself, naming the iteration
            warnings.filterwarnings("ignore", message=".*cut at max_new_tokens")
            rb = rollout(self.model, ids, params, eos_token_id=self.eos, pad_token_id=self.pad,
                         tokenizer=self.tokenizer, batch_size=self.batch_size,
                         logits_processor=self.logits_processor())
        comp = [c[:-1] if why == "eos" else list(c)
                for c, why in zip(rb.completion_ids, rb.finish_reasons)]
        index = [i for i in range(len(prompts)) for _ in range(n)]
        return Rollouts([prompts[i] for i in index], rb.texts, comp, rb.finish_reasons, index,
                        [ids[i] for i in index])

    def to_batch(self, r: Rollouts) -> dict[str, torch.Tensor]:
        """Right-padded prompt+completion(+eos when it stopped) ids; ``loss_mask`` on the completion."""
        prompt_ids = r.prompt_ids if r.prompt_ids is not None else self._encode(r.prompts)
        rows, starts = [], []
        for p, ids, why in zip(prompt_ids, r.completion_ids, r.finish_reasons):
            # The eos that ended a completion is an action too: without it the policy never
            # learns to stop.
            rows.append(list(p) + list(ids) + ([self.eos] if why == "eos" else []))
            starts.append(len(p))
        return completion_rows(rows, starts, self.pad)


# ---------------------------------------------------------------------------------- policy


class PolicyObjective:
    """The loop's ``Algorithm``: a registered policy loss reduced by a registered aggregation.

    ``num_items`` comes from the aggregation, so the loop's window normalisation makes the
    update independent of how a minibatch is split into micro-batches.
    """

    def __init__(self, policy_loss: str = "ppo_clip", aggregation: str = "token_mean", *,
                 clip_eps_low: float = 0.2, clip_eps_high: float | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", max_tokens: int | None = None,
                 temperature: float = 1.0, entropy: bool = False, prefix_sharing: bool = True) -> None:
        self.loss_fn = POLICY_LOSSES.get(policy_loss)
        self.aggregation, self.max_tokens = aggregation, max_tokens
        self.clip = dict(clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.temperature, self.entropy = temperature, entropy
        self.prefix_sharing = prefix_sharing

    def num_items(self, batch: dict[str, Any]) -> float:
        return float(num_items(batch["loss_mask"], self.aggregation))

    def policy_logprobs(self, model: torch.nn.Module, batch: dict[str, Any],
                        return_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """log π(y_t) as this objective defines the policy (NLPO's restricts it to an action mask)."""
        return grouped_token_logprobs(model, batch, temperature=self.temperature,
                                      return_entropy=return_entropy,
                                      prefix_sharing=self.prefix_sharing)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        out = self.policy_logprobs(model, batch, return_entropy=self.entropy)
        lp, ent = out if self.entropy else (out, None)
        loss_sum, _, metrics = self.policy_loss(lp, ent, batch)
        return LossOutput(loss_sum, metrics)

    def policy_loss(self, lp: torch.Tensor, ent: torch.Tensor | None, batch: dict[str, Any]
                    ) -> tuple[torch.Tensor, int, dict[str, float]]:
        """``(loss sum, num items, metrics)`` of the registered policy loss on log-probs ``lp``."""
        mask = batch["loss_mask"]
        # Absent when the rollout batch gets exactly one optimizer step: the sampling policy is
        # then the current one, so the ratio is exactly 1 and an extra forward pass is saved.
        old = batch["old_logprobs"] if "old_logprobs" in batch else lp.detach()
        res = self.loss_fn(lp, old, batch["advantages"], mask, **self.clip,
                           ref_logprobs=batch.get("ref_logprobs"), kl_coef=self.kl_coef,
                           kl_estimator=self.kl_estimator, entropy=ent)
        loss_sum, items = aggregate(res.per_token_loss, mask, self.aggregation, self.max_tokens)
        return loss_sum, items, {k: float(v) for k, v in res.metrics.items()}


class PolicyRole:
    """Owns the trained model, its optimizer and schedule; ``update(experience) -> metrics``."""

    def __init__(self, model: torch.nn.Module, objective: PolicyObjective, cfg: TrainSection, *,
                 epochs: int = 1, minibatch_size: int | None = None,
                 micro_batch_size: int | None = None, seed: int = 0,
                 extra_groups: tuple[dict[str, Any], ...] = ()) -> None:
        self.model, self.objective, self.cfg = model, objective, cfg
        self.device = pick_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        model.to(self.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg)
        # extra_groups (a shared critic's value head, its own lr) train in the same optimizer
        for group in extra_groups:
            self.optimizer.add_param_group({"weight_decay": 0.0, **group})
            self.params += list(group["params"])
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.epochs, self.minibatch_size = epochs, minibatch_size
        self.micro_batch_size = micro_batch_size or cfg.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0

    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
        """Per-token log-probs of ``batch`` under the policy as the objective defines it, or under
        another ``model`` (the reference) as a plain softmax; no gradient."""
        if model is None:
            model, fn = self.model, self.objective.policy_logprobs
        else:
            fn = functools.partial(grouped_token_logprobs, temperature=temperature,
                                   prefix_sharing=getattr(self.objective, "prefix_sharing", True))
        was_training = model.training
        model.eval()
        try:
            parts = []
            for start in range(0, batch["input_ids"].shape[0], self.micro_batch_size):
                micro = to_device({k: v[start:start + self.micro_batch_size]
                                   for k, v in batch.items()}, self.device)
                parts.append(fn(model, micro).cpu())
            return torch.cat(parts)
        finally:
            model.train(was_training)

    def update(self, experience: dict[str, torch.Tensor]) -> dict[str, float]:
        """``epochs`` passes over shuffled minibatches, one optimizer step each; one LR step."""
        self.model.train()
        n = experience["input_ids"].shape[0]
        mb = min(self.minibatch_size or n, n)
        sums: dict[str, float] = {}
        count = 0
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, mb):
                idx = order[start:start + mb]
                micro = [{k: v[idx[j:j + self.micro_batch_size]] for k, v in experience.items()}
                         for j in range(0, len(idx), self.micro_batch_size)]
                micro = [m for m in micro if self.objective.num_items(m) > 0]
                if not micro:
                    continue
                loss, _, metrics = forward_backward(self.model, self.objective, micro, self.device,
                                                    self.precision, step=self.updates + 1)
                grad_norm = optimizer_step(self.params, self.optimizer, self.cfg.max_grad_norm,
                                           step=self.updates + 1)
                self.updates += 1
                count += 1
                for k, v in {"loss": loss, "grad_norm": float(grad_norm), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v
        self.scheduler.step()
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["optimizer_steps"] = count
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])
