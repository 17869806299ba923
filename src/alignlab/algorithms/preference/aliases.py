"""``alignlab train preference`` and its aliases (``dpo``, ``ipo``, ``kto``, …): the preference
trainer registered once per loss, each alias's config defaulting to that loss."""

from __future__ import annotations

from alignlab.algorithms.preference.trainer import (
    PreferenceConfig,
    PreferenceSection,
    run_preference,
)
from alignlab.algorithms.registry import ALGORITHMS, AlgorithmEntry
from alignlab.core.config import TrainSection
from alignlab.losses.preference import PREFERENCE_LOSSES

ALIASES = ("dpo", "ipo", "simpo", "orpo", "kto", "cpo", "bco", "lipo_lambda")


def alias_config(loss: str) -> type[PreferenceConfig]:
    """``PreferenceConfig`` whose default loss is ``loss`` (so ``alignlab train kto`` works)."""
    return type(f"{loss.upper()}Config", (PreferenceConfig,), {
        "__annotations__": {"preference": PreferenceSection, "train": TrainSection},
        "preference": PreferenceSection(loss=loss),
        "train": TrainSection(output_dir=f"runs/{loss}", lr=1e-5, max_steps=200, batch_size=8)})


def _register() -> None:
    ALGORITHMS.register("preference")(AlgorithmEntry(
        PreferenceConfig, run_preference,
        "Offline preference optimisation with any registered loss or mixture (DPO family; "
        "paired, unpaired, listwise)."))
    for loss in ALIASES:
        ALGORITHMS.register(loss)(AlgorithmEntry(
            alias_config(loss), run_preference,
            f"The preference trainer with preference.loss={loss} "
            f"({PREFERENCE_LOSSES.summary(loss)})"))


_register()

__all__ = ["ALIASES", "alias_config"]
