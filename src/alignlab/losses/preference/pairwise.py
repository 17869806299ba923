"""Paired losses against a reference model: DPO and the variants that change its link function.

Notation: a = π_c − ref_c, b = π_r − ref_r (sequence log-prob sums), h = a − b, rewards β·a, β·b.
Names follow TRL's ``loss_type`` where TRL has the loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlab.losses.preference.base import (
    LossResult,
    MissingInputError,
    PreferenceInputs,
    implicit_rewards,
    logratios,
    mean_logps,
    paired_result,
    preference_loss,
    smoothed_sigmoid_loss,
)

PAIR = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def dpo_logits(inputs: PreferenceInputs, beta: float) -> Tensor:
    a, b = logratios(inputs)
    return beta * (a - b)


@preference_loss("dpo", "sigmoid", kind="paired", requires=PAIR)
def dpo(inputs: PreferenceInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossResult:
    """DPO: −log σ(β·((π_c − ref_c) − (π_r − ref_r))).

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model". ``label_smoothing`` > 0 gives conservative DPO (see ``cdpo``)."""
    losses = smoothed_sigmoid_loss(dpo_logits(inputs, beta), label_smoothing)
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("sigmoid_norm", kind="paired", requires=(*PAIR, "chosen_lengths", "rejected_lengths"))
def sigmoid_norm(inputs: PreferenceInputs, *, beta: float = 5.0) -> LossResult:
    """Length-normalised DPO: −log σ(β·(a/|y_c| − b/|y_r|)), per-token log-ratios.

    Meng et al. 2024, "SimPO" (appendix ablation "DPO w/ LN"), as trained in Lambert et al.
    2024, "Tülu 3: Pushing Frontiers in Open Language Model Post-Training" (TRL
    ``sigmoid_norm``). Per-token log-ratios are |y| times smaller than sums, hence the larger
    default β (Tülu 3's 5; TRL keeps its usual 0.1). Rewards are β times the per-token ratios."""
    a, b = logratios(inputs)
    a, b = mean_logps(a, inputs.chosen_lengths), mean_logps(b, inputs.rejected_lengths)
    losses = -F.logsigmoid(beta * (a - b))
    return paired_result(losses, beta * a.detach(), beta * b.detach())


@preference_loss("cdpo", kind="paired", requires=PAIR)
def cdpo(inputs: PreferenceInputs, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossResult:
    """Conservative DPO: −(1−ε)·log σ(βh) − ε·log σ(−βh), labels flipped with probability ε.

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO". ε = 0 is DPO.
    TRL 1.16's DPO ``sigmoid`` ignores ``label_smoothing``, so it has no equivalent there (its
    ``robust`` is ``rdpo_robust``)."""
    losses = smoothed_sigmoid_loss(dpo_logits(inputs, beta), label_smoothing)
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("rdpo_robust", "robust", kind="paired", requires=PAIR)
def rdpo_robust(inputs: PreferenceInputs, *, beta: float = 0.1,
                label_smoothing: float = 0.1) -> LossResult:
    """Robust DPO for labels flipped with rate ε: [(1−ε)·ℓ(βh) − ε·ℓ(−βh)] / (1−2ε), ℓ = −log σ.

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback"
    (unbiased estimate of the clean-label loss; TRL ``robust``). ε = 0 is DPO."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"rdpo_robust: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = dpo_logits(inputs, beta)
    losses = (-F.logsigmoid(z) * (1 - label_smoothing)
              + F.logsigmoid(-z) * label_smoothing) / (1 - 2 * label_smoothing)
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("rdpo_length", kind="paired", requires=(*PAIR, "chosen_lengths", "rejected_lengths"))
def rdpo_length(inputs: PreferenceInputs, *, beta: float = 0.1, alpha: float = 0.01) -> LossResult:
    """Length-regularised DPO: −log σ(βh + α·(|y_c| − |y_r|)).

    Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization"
    (R-DPO, the regulariser enters the logit as +α|y_w| − α|y_l|). A pair whose chosen answer is
    longer already starts with a larger logit, so it gets *less* gradient than under DPO and a
    longer-is-better shortcut is not rewarded; a shorter chosen answer gets more."""
    extra = (inputs.chosen_lengths - inputs.rejected_lengths).to(inputs.chosen_logps.dtype)
    losses = -F.logsigmoid(dpo_logits(inputs, beta) + alpha * extra)
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("ipo", kind="paired", requires=PAIR, optional=("chosen_lengths", "rejected_lengths"))
def ipo(inputs: PreferenceInputs, *, beta: float = 0.1, length_normalize: bool = False) -> LossResult:
    """IPO: (h − 1/(2β))², a squared loss whose minimum is the finite margin h = 1/(2β).

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (ΨPO with Ψ = identity), on sequence sums as in the paper. ``length_normalize``
    uses a/|y_c| − b/|y_r| instead, TRL's convention (config ``preference.ipo_length_normalize``);
    the rewards are then β times those per-token log-ratios."""
    a, b = logratios(inputs)
    if length_normalize:
        if inputs.chosen_lengths is None or inputs.rejected_lengths is None:
            raise MissingInputError("preference loss 'ipo' with length_normalize=True needs "
                                    "chosen_lengths and rejected_lengths, which are None")
        a, b = mean_logps(a, inputs.chosen_lengths), mean_logps(b, inputs.rejected_lengths)
    losses = (a - b - 1 / (2 * beta)) ** 2
    return paired_result(losses, beta * a.detach(), beta * b.detach())


@preference_loss("hinge", kind="paired", requires=PAIR)
def hinge(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """Hinge on the normalised likelihood margin: max(0, 1 − βh).

    Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization" (the
    SLiC loss with a reference model; TRL ``hinge``)."""
    losses = torch.relu(1 - dpo_logits(inputs, beta))
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("exo_pair", kind="paired", requires=PAIR)
def exo_pair(inputs: PreferenceInputs, *, beta: float = 0.1,
             label_smoothing: float = 1e-3) -> LossResult:
    """EXO: reverse KL from p_θ = σ(βh) to the soft label (1−ε, ε):
    σ(βh)·(log σ(βh) − log(1−ε)) + σ(−βh)·(log σ(−βh) − log ε).

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment" (eq. 16;
    TRL ``exo_pair``, ε defaults to 1e-3)."""
    eps = label_smoothing
    z = dpo_logits(inputs, beta)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("nca_pair", kind="paired", requires=PAIR)
def nca_pair(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """NCA: −log σ(βa) − ½·log σ(−βa) − ½·log σ(−βb), absolute (not relative) likelihoods.

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"."""
    a, b = logratios(inputs)
    losses = -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("bco_pair", kind="paired", requires=PAIR)
def bco_pair(inputs: PreferenceInputs, *, beta: float = 0.1,
             reward_shift: float | Tensor = 0.0) -> LossResult:
    """BCO on pairs: −log σ(βa − δ) − log σ(−(βb − δ)), δ = mean of the rewards seen so far.

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment". The
    preference trainer keeps δ as the cumulative mean of every βa and βb of training so far
    (TRL's ``RunningMoments``; the paper's "moving average" fixes no decay), saves it for resume
    and passes it as ``reward_shift``. ``metrics['rewards/mean']`` is this batch's mean."""
    a, b = logratios(inputs)
    losses = -F.logsigmoid(beta * a - reward_shift) - F.logsigmoid(-(beta * b - reward_shift))
    chosen, rejected = implicit_rewards(inputs, beta)
    return paired_result(losses, chosen, rejected,
                         **{"rewards/mean": torch.cat([chosen, rejected]).mean()})


@preference_loss("apo_zero", kind="paired", requires=PAIR)
def apo_zero(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """APO-zero: (1 − σ(βa)) + σ(βb), raise the chosen and lower the rejected likelihood.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions:
    Addressing Underspecification in Alignment" (for chosen answers better than the model's)."""
    a, b = logratios(inputs)
    losses = 1 - torch.sigmoid(beta * a) + torch.sigmoid(beta * b)
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("apo_down", kind="paired", requires=PAIR)
def apo_down(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """APO-down: σ(βa) + (1 − σ(β(a − b))), lower both likelihoods, the rejected one more.

    D'Oosterlinck et al. 2024 (APO, see ``apo_zero``), for chosen answers worse than the
    model's own; unlike the others it does not raise the chosen likelihood."""
    a, b = logratios(inputs)
    losses = torch.sigmoid(beta * a) + 1 - torch.sigmoid(beta * (a - b))
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("sppo_hard", kind="paired", requires=PAIR)
def sppo_hard(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """SPPO with hard win probabilities: (a − 1/(2β))² + (b + 1/(2β))².

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment" (the
    chosen wins with probability 1, so its log-ratio regresses to +1/(2β); TRL ``sppo_hard``)."""
    a, b = logratios(inputs)
    losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("dpop", kind="paired", requires=PAIR)
def dpop(inputs: PreferenceInputs, *, beta: float = 0.1, lambda_: float = 50.0) -> LossResult:
    """DPO-Positive: −log σ(β·(h − λ·max(0, ref_c − π_c))).

    Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive":
    penalises the chosen likelihood dropping below the reference's."""
    a, _ = logratios(inputs)
    penalty = torch.relu(-a)
    losses = -F.logsigmoid(dpo_logits(inputs, beta) - beta * lambda_ * penalty)
    return paired_result(losses, *implicit_rewards(inputs, beta), **{"dpop/penalty": penalty.mean()})


@preference_loss("discopop", kind="paired", requires=PAIR)
def discopop(inputs: PreferenceInputs, *, beta: float = 0.05, tau: float = 0.05) -> LossResult:
    """DiscoPOP (log-ratio modulated loss): (1 − σ(βh/τ))·(−log σ(βh)) + σ(βh/τ)·exp(−βh).

    Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large
    Language Models" (LLM-discovered blend of logistic and exponential losses; TRL
    ``discopop``, τ = ``discopop_tau``). The loss is not convex: around βh = 0 (about
    −0.12 < βh < 0.07 for τ = 0.05) the switch from the logistic to the exponential part makes
    the gradient push the margin down; outside that band it raises the margin like DPO."""
    z = dpo_logits(inputs, beta)
    mix = torch.sigmoid(z / tau)
    losses = -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("aot_paired", kind="paired", requires=PAIR)
def aot_paired(inputs: PreferenceInputs, *, beta: float = 0.1,
               label_smoothing: float = 0.0) -> LossResult:
    """AOT, paired: −log σ(β·(sort(π_c − π_r)_i − sort(ref_c − ref_r)_i)) per quantile i.

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"
    (paired form; TRL ``aot``): the policy's distribution of chosen-minus-rejected log-prob
    margins should first-order dominate the reference's, solved by sorting (1-D optimal
    transport). ``losses[i]`` is the i-th quantile pair, not the i-th input pair."""
    delta = (torch.sort(inputs.chosen_logps - inputs.rejected_logps).values
             - torch.sort(inputs.ref_chosen_logps - inputs.ref_rejected_logps).values)
    losses = smoothed_sigmoid_loss(beta * delta, label_smoothing)
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("aot_unpaired_on_pairs", "aot_pair", kind="paired", requires=PAIR)
def aot_unpaired_on_pairs(inputs: PreferenceInputs, *, beta: float = 0.1,
                          label_smoothing: float = 0.0) -> LossResult:
    """AOT, unpaired, on paired data: −log σ(β·(sort(a)_i − sort(b)_i)) per quantile i.

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"
    (unpaired form): the chosen log-ratios a = π_c − ref_c are read as one sample and the
    rejected b = π_r − ref_r as another, the pairing is ignored, and the chosen distribution
    should dominate the rejected one. TRL 1.16 calls this DPO ``aot_unpaired``; ``aot_pair`` is
    kept as an alias because TRL < 1.0 (and alignlab before) used that name for this formula.
    For the paper's paired form use ``aot_paired``; for labelled data ``aot_unpaired``."""
    a, b = logratios(inputs)
    delta = torch.sort(a).values - torch.sort(b).values
    losses = smoothed_sigmoid_loss(beta * delta, label_smoothing)
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("mmpo", "margin_matching", kind="paired", requires=(*PAIR, "margin"))
def mmpo(inputs: PreferenceInputs, *, beta: float = 0.1, gamma: float = 1.0) -> LossResult:
    """MMPO: cross-entropy of σ(βh) against the soft target p* = σ(γ·margin),
    −p*·log σ(βh) − (1−p*)·log σ(−βh), margin = score(chosen) − score(rejected).

    Kim et al. 2024, "Margin Matching Preference Optimization: Enhanced Model Alignment with
    Granular Feedback". A large margin gives p* → 1 (DPO); equal scores give p* = ½."""
    target = torch.sigmoid(gamma * inputs.margin.to(inputs.chosen_logps.dtype))
    z = dpo_logits(inputs, beta)
    losses = -target * F.logsigmoid(z) - (1 - target) * F.logsigmoid(-z)
    return paired_result(losses, *implicit_rewards(inputs, beta))


@preference_loss("dpo_ties", kind="paired", requires=(*PAIR, "ties"))
def dpo_ties(inputs: PreferenceInputs, *, beta: float = 0.1, log_theta: float = 1.0) -> LossResult:
    """DPO with ties under the Rao-Kupper model, d = βh, α = log θ > 0:
    P(c ≻ r) = σ(d − α); P(tie) = (θ² − 1)·σ(d − α)·σ(−d − α). Loss = −log P(observed outcome).

    Chen et al. 2024, "On Extending Direct Preference Optimization to Accommodate Ties" (see also
    Guo et al. 2024, "TODO: Enhancing LLM Alignment with Ternary Preferences"). Tied pairs pull
    h towards 0 instead of being dropped."""
    if log_theta <= 0:
        raise ValueError(f"dpo_ties: log_theta must be > 0, got {log_theta}")
    d = dpo_logits(inputs, beta)
    win = F.logsigmoid(d - log_theta)
    tie = math.log(math.expm1(2 * log_theta)) + win + F.logsigmoid(-d - log_theta)
    ties = inputs.ties.bool()
    losses = -torch.where(ties, tie, win)
    return paired_result(losses, *implicit_rewards(inputs, beta),
                         **{"ties/fraction": ties.float().mean()})
