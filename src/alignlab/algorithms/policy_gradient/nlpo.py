"""NLPO's top-p action mask (Ramamurthy et al. 2023, "Is Reinforcement Learning (Not) for Natural
Language Processing: Benchmarks, Baselines, and Building Blocks for NLPO", RL4LMs).

NLPO is PPO whose policy may only choose, at each step t, among the tokens of the smallest set
M_t whose probability under a *masking policy* π_ψ sums to at least p (top-p, Holtzman et al.
2020); π_ψ is a frozen copy of the policy, refreshed with the policy's weights every μ
iterations (``rl.nlpo_update_every``). The acting policy is π restricted to M_t and renormalised:

    π^M(y_t | s_t) = π(y_t | s_t) · 1[y_t ∈ M_t] / Σ_{v ∈ M_t} π(v | s_t)

and that one distribution is used everywhere: sampling (a ``LogitsProcessor`` in the rollout
engine sets the logits outside M_t to −inf), the old log-probs, and the log-probs of the PPO
ratio (``restricted_token_logprobs``), so the ratio compares π^M_θ with π^M_θ_old. M_t comes
from π_ψ's untempered distribution. The reference of the KL penalty stays unmasked, so the
penalty is that of the acting policy π^M and counts the truncation too (−log π(M_t) per token).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from alignlab.algorithms.policy_gradient.objective import PolicyObjective
from alignlab.algorithms.policy_gradient.ppo import PPO
from alignlab.engine import sharding
from alignlab.models.adapters import adapter_state_dict, frozen_copy, load_adapter_state_dict
from alignlab.models.logprobs import next_token_logits, restricted_token_logprobs
from alignlab.rollout.filters import top_p_filter


def top_p_set(logits: Tensor, top_p: float) -> Tensor:
    """Bool ``[..., V]``: the smallest set of most likely tokens with probability ≥ ``top_p``
    (ties with its least likely member included; never empty)."""
    return torch.isfinite(top_p_filter(logits.float(), top_p))


class ActionMask:
    """The masking policy π_ψ: a frozen copy of the policy and the top-p set it defines."""

    def __init__(self, policy: nn.Module, top_p: float, update_every: int,
                 device: torch.device | str | None = None) -> None:
        self.model = frozen_copy(policy)  # under LoRA: the adapters copied, the base shared
        if device is not None:
            self.model.to(device)
        self.top_p, self.update_every = top_p, update_every
        self.refreshes = 0
        self.refreshed_at = 0

    def maybe_refresh(self, policy: nn.Module, iteration: int) -> bool:
        """π_ψ ← π at every ``update_every``-th iteration (not at 0: π_ψ starts as π)."""
        if iteration == 0 or iteration % self.update_every or iteration == self.refreshed_at:
            return False
        if sharding.is_sharded(policy):  # FSDP2: the full weights, gathered on every rank
            self.model.load_state_dict(sharding.gathered_state_dict(policy))
        else:  # LoRA: the adapters (the base is shared); ZeRO-1/2 keep whole weights on each rank
            load_adapter_state_dict(self.model, adapter_state_dict(policy))
        self.refreshes += 1
        self.refreshed_at = iteration
        return True

    @torch.no_grad()
    def allowed(self, batch: dict[str, Any]) -> Tensor:
        """M_t at every scored position of ``batch`` (the rows of ``next_token_logits``)."""
        logits, targets, _ = next_token_logits(self.model, batch)
        keep = top_p_set(logits, self.top_p)
        # The sampled token was in M_t at rollout time; a full forward here may differ from the
        # rollout's cached one in the last bits and drop a boundary token, making log π^M = −inf.
        keep[torch.arange(len(targets), device=keep.device), targets] = True
        return keep

    def processor(self) -> "TopPMaskProcessor":
        return TopPMaskProcessor(self.model, self.top_p)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": adapter_state_dict(self.model), "refreshes": self.refreshes,
                "refreshed_at": self.refreshed_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_adapter_state_dict(self.model, state["weights"])
        self.refreshes, self.refreshed_at = int(state["refreshes"]), int(state["refreshed_at"])


class TopPMaskProcessor:
    """The engine's ``LogitsProcessor`` for NLPO: runs π_ψ alongside the policy (its own KV
    cache, the same rows) and sets the policy's logits outside M_t to −inf."""

    def __init__(self, mask_model: nn.Module, top_p: float) -> None:
        self.model, self.top_p = mask_model, top_p
        self.cache: DynamicCache | None = None
        self.logits: Tensor | None = None

    def start(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
              n: int) -> None:
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=self.cache, use_cache=True)
        self.logits = out.logits[:, -1]
        if n > 1:
            self.cache.batch_repeat_interleave(n)
            self.logits = self.logits.repeat_interleave(n, 0)

    def __call__(self, logits: Tensor) -> Tensor:
        return logits.masked_fill(~top_p_set(self.logits, self.top_p), float("-inf"))

    def advance(self, tokens: Tensor, keep: Tensor | None, attention_mask: Tensor,
                position_ids: Tensor) -> None:
        if keep is not None:
            self.cache.batch_select_indices(keep)
        out = self.model(input_ids=tokens[:, None], attention_mask=attention_mask,
                         position_ids=position_ids, cache=self.cache, use_cache=True)
        self.logits = out.logits[:, -1]


class MaskedPolicyObjective(PolicyObjective):
    """PPO's objective on π^M: the policy's log-probs renormalised over π_ψ's top-p sets."""

    def __init__(self, action_mask: ActionMask, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.action_mask = action_mask

    def policy_logprobs(self, model: nn.Module, batch: dict[str, Any],
                        return_entropy: bool = False) -> Tensor | tuple[Tensor, ...]:
        return restricted_token_logprobs(model, batch, self.action_mask.allowed(batch),
                                         temperature=self.temperature,
                                         return_entropy=return_entropy)


class NLPO(PPO):
    """PPO whose acting policy is π^M: ``begin_iteration`` refreshes the masking policy, the
    rollout role samples through ``logits_processor`` and the objective (``MaskedPolicyObjective``)
    restricts the ratio's log-probs to the same sets."""

    def __init__(self, *args: Any, action_mask: ActionMask, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.action_mask = action_mask

    def begin_iteration(self, iteration: int) -> None:
        self.action_mask.maybe_refresh(self.learner.model, iteration)

    def logits_processor(self) -> TopPMaskProcessor:
        return self.action_mask.processor()

    def advantages(self, exp: dict[str, Tensor]) -> dict[str, float]:
        metrics = super().advantages(exp)
        metrics["nlpo_mask_refreshes"] = self.action_mask.refreshes
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "action_mask": self.action_mask.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.action_mask.load_state_dict(state["action_mask"])
