"""Preference losses (the DPO family): pure tensor functions in ``PREFERENCE_LOSSES``.

``PREFERENCE_LOSSES.get("dpo")(PreferenceInputs(...), beta=0.1) -> LossResult``;
``loss_spec(name)`` tells a trainer the loss's kind, whether it needs a reference model, the
input fields it reads and its default hyper-parameters. See ``base.py`` for the conventions.
"""

from alignlab.losses.preference import (
    divergences,
    listwise,
    pairwise,
    reference_free,
    unpaired,
    weighted,
)
from alignlab.losses.preference.base import (
    PREFERENCE_LOSSES,
    LossResult,
    LossSpec,
    MissingInputError,
    PreferenceInputs,
    loss_spec,
)
from alignlab.losses.preference.combine import combine_losses
from alignlab.losses.preference.weighted import update_group_weights

__all__ = [
    "PREFERENCE_LOSSES",
    "LossResult",
    "LossSpec",
    "MissingInputError",
    "PreferenceInputs",
    "combine_losses",
    "divergences",
    "listwise",
    "loss_spec",
    "pairwise",
    "reference_free",
    "unpaired",
    "update_group_weights",
    "weighted",
]
