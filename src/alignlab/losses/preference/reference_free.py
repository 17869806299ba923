"""Paired losses without a reference model, and the SFT term they (and MPO) add.

No ``ref_*`` field is read, so a trainer using them never runs a second model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignlab.losses.preference.base import (
    LossResult,
    PreferenceInputs,
    mean_logps,
    paired_result,
    preference_loss,
    smoothed_sigmoid_loss,
)

POLICY = ("chosen_logps", "rejected_logps")
LENGTHS = ("chosen_lengths", "rejected_lengths")


@preference_loss("sft", "nll", kind="paired", requires=("chosen_logps", "chosen_lengths"))
def sft(inputs: PreferenceInputs) -> LossResult:
    """Per-token negative log-likelihood of the chosen completion: −π_c/|y_c|.

    The SFT term of RPO/MPO/CPO-style mixtures (``combine_losses``); Ouyang et al. 2022,
    "Training language models to follow instructions with human feedback" (SFT stage)."""
    losses = -mean_logps(inputs.chosen_logps, inputs.chosen_lengths)
    return paired_result(losses, None, None)


@preference_loss("simpo", kind="paired", requires=(*POLICY, *LENGTHS))
def simpo(inputs: PreferenceInputs, *, beta: float = 2.0, gamma: float = 0.5,
          label_smoothing: float = 0.0) -> LossResult:
    """SimPO: −log σ(β·(π_c/|y_c| − π_r/|y_r|) − γ), length-normalised and reference-free.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (γ is the target reward margin; TRL's CPOTrainer ``simpo`` with ``simpo_gamma``)."""
    chosen = beta * mean_logps(inputs.chosen_logps, inputs.chosen_lengths)
    rejected = beta * mean_logps(inputs.rejected_logps, inputs.rejected_lengths)
    losses = smoothed_sigmoid_loss(chosen - rejected - gamma, label_smoothing)
    return paired_result(losses, chosen.detach(), rejected.detach())


@preference_loss("alphapo", kind="paired", requires=(*POLICY, *LENGTHS))
def alphapo(inputs: PreferenceInputs, *, beta: float = 2.5, gamma: float = 0.1,
            alpha: float = 0.25) -> LossResult:
    """AlphaPO: SimPO with the reward r_α = (1 − π(y)^{−α/|y|})/α, −log σ(β·(r_α(y_c) − r_α(y_r)) − γ).

    Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment". α → 0 is SimPO's
    per-token log-prob; α > 0 flattens the reward as the likelihood falls, limiting how far the
    chosen likelihood is pushed down with the rejected one. Defaults: the paper's Mistral-Instruct
    setting (α = 0.25, β = 2.5, γ = 0.1); TRL's CPOTrainer ``alpha``."""
    def reward(logps, lengths):
        mean = mean_logps(logps, lengths)
        return mean if alpha == 0 else -torch.expm1(-alpha * mean) / alpha

    chosen = beta * reward(inputs.chosen_logps, inputs.chosen_lengths)
    rejected = beta * reward(inputs.rejected_logps, inputs.rejected_lengths)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return paired_result(losses, chosen.detach(), rejected.detach())


@preference_loss("orpo", kind="paired", requires=(*POLICY, *LENGTHS))
def orpo(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """ORPO: NLL(chosen) − β·log σ(log odds(y_c) − log odds(y_r)), with odds(y) = p/(1−p) and
    log p = π/|y| the per-token average log-prob.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (β is the paper's λ). The NLL is over the response tokens only, as in the paper; TRL's
    ``ORPOTrainer`` takes it over prompt and response, so its values differ."""
    pc = mean_logps(inputs.chosen_logps, inputs.chosen_lengths)
    pr = mean_logps(inputs.rejected_logps, inputs.rejected_lengths)
    # log(1 − p) from log p without cancellation; −1e-6 keeps log1p(−1) finite at p = 1
    log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc.clamp(max=-1e-6)))
                            - torch.log1p(-torch.exp(pr.clamp(max=-1e-6))))
    ratio = F.logsigmoid(log_odds)
    losses = -pc - beta * ratio
    return paired_result(losses, beta * pc.detach(), beta * pr.detach(),
                         **{"orpo/log_odds_ratio": ratio.mean(), "orpo/log_odds_chosen": log_odds.mean(),
                            "orpo/nll": -pc.mean()})


@preference_loss("cpo", kind="paired", requires=(*POLICY, "chosen_lengths"))
def cpo(inputs: PreferenceInputs, *, beta: float = 0.1, alpha: float = 1.0,
        label_smoothing: float = 0.0) -> LossResult:
    """CPO: −log σ(β·(π_c − π_r)) + α·NLL(chosen), DPO with a uniform reference plus a BC term.

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation" (α = TRL's ``cpo_alpha``; NLL is per token)."""
    chosen, rejected = beta * inputs.chosen_logps, beta * inputs.rejected_logps
    nll = -mean_logps(inputs.chosen_logps, inputs.chosen_lengths)
    losses = smoothed_sigmoid_loss(chosen - rejected, label_smoothing) + alpha * nll
    return paired_result(losses, chosen.detach(), rejected.detach(), **{"cpo/nll": nll.mean()})


@preference_loss("slic_hf", "slic", kind="paired", requires=POLICY)
def slic_hf(inputs: PreferenceInputs, *, delta: float = 1.0, lambda_reg: float = 0.0) -> LossResult:
    """SLiC-HF: max(0, δ − π_c + π_r) − λ·π_c (rank calibration plus a likelihood regulariser
    on the chosen completion, standing in for the SFT target).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback". For the
    reference-normalised hinge of the RSO paper use ``hinge``."""
    losses = torch.relu(delta - inputs.chosen_logps + inputs.rejected_logps)
    if lambda_reg:
        losses = losses - lambda_reg * inputs.chosen_logps
    return paired_result(losses, inputs.chosen_logps.detach(), inputs.rejected_logps.detach())
