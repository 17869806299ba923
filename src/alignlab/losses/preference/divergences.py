"""f-DPO: DPO under other f-divergence constraints than the reverse KL.

Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
Divergence Constraints". With u = π/ref the implicit reward becomes β·f'(u), so the loss is
−log σ(β·(f'(u_c) − f'(u_r))). Reverse KL, forward KL and JS match TRL's ``f_divergence_type``
(up to constants that cancel in the difference); the α-divergence follows the paper, whose α is
TRL's 1 − ``f_alpha_divergence_coef``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlab.losses.preference.base import (
    LossResult,
    PreferenceInputs,
    logratios,
    paired_result,
    preference_loss,
)
from alignlab.losses.preference.pairwise import PAIR

# exp of a log-ratio above this overflows fp32; pairs that far apart are already separated.
_MAX_EXP = 80.0


def _capped_exp(x: Tensor) -> Tensor:
    return torch.exp(torch.clamp(x, max=_MAX_EXP))


def _fdpo(inputs: PreferenceInputs, beta: float, derivative) -> LossResult:
    a, b = logratios(inputs)
    fa, fb = derivative(a), derivative(b)
    losses = -F.logsigmoid(beta * (fa - fb))
    return paired_result(losses, beta * fa.detach(), beta * fb.detach())


@preference_loss("fdpo_reverse_kl", kind="paired", requires=PAIR)
def fdpo_reverse_kl(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """f-DPO, reverse KL: f'(u) = log u + 1, so the logit is β·(a − b), identical to DPO.

    Wang et al. 2023, "Beyond Reverse KL" (see the module docstring)."""
    return _fdpo(inputs, beta, lambda r: r)


@preference_loss("fdpo_forward_kl", kind="paired", requires=PAIR)
def fdpo_forward_kl(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """f-DPO, forward KL: f'(u) = −1/u, logit β·(e^{−b} − e^{−a}) (mass-covering).

    Wang et al. 2023, "Beyond Reverse KL" (see the module docstring)."""
    return _fdpo(inputs, beta, lambda r: -_capped_exp(-r))


@preference_loss("fdpo_js", kind="paired", requires=PAIR)
def fdpo_js(inputs: PreferenceInputs, *, beta: float = 0.1) -> LossResult:
    """f-DPO, Jensen-Shannon: f'(u) = log(2u/(1+u)), logit β·((a − softplus(a)) − (b − softplus(b))).

    Wang et al. 2023, "Beyond Reverse KL" (see the module docstring)."""
    return _fdpo(inputs, beta, lambda r: r - F.softplus(r))


@preference_loss("fdpo_alpha", kind="paired", requires=PAIR)
def fdpo_alpha(inputs: PreferenceInputs, *, beta: float = 0.1, alpha: float = 0.5) -> LossResult:
    """f-DPO, α-divergence: f'(u) = (1 − u^{−α})/α, logit β·(e^{−αb} − e^{−αa})/α.

    Wang et al. 2023, "Beyond Reverse KL". α → 0 recovers reverse KL, α = 1 is forward KL. TRL
    writes f'(u) = (u^{α'−1} − 1)/(α' − 1): its ``f_alpha_divergence_coef`` α' = 1 − α gives
    this loss, and the same number passed to both agrees only at 0.5 (TRL's α' = 1 is reverse
    KL). alignlab keeps the paper's α."""
    if alpha <= 0:
        raise ValueError(f"fdpo_alpha: alpha must be > 0, got {alpha}")
    return _fdpo(inputs, beta, lambda r: (1 - _capped_exp(-alpha * r)) / alpha)
