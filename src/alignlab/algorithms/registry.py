"""``ALGORITHMS``: every trainer ``alignlab train <name>`` can run, with its config class.

A trainer module registers itself at import (``ALGORITHMS.register("sft")(AlgorithmEntry(...))``)
and is listed once in the registry's ``builtins``, imported on the first lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from alignlab.core.registry import Registry


@dataclass(frozen=True)
class AlgorithmEntry:
    """A trainer: its typed config and the function that runs it."""

    config_cls: type[BaseModel]
    run: Callable[[Any], Any]
    doc: str

    @property
    def __doc__(self) -> str:  # shown by ``alignlab list algorithms -v``
        return self.doc


ALGORITHMS: Registry[AlgorithmEntry] = Registry("algorithm", builtins=(
    "alignlab.algorithms.sft",
    "alignlab.algorithms.preference.aliases",
    "alignlab.algorithms.reward_model.trainer",
    "alignlab.algorithms.preference_model.trainer",
    "alignlab.algorithms.policy_gradient.run",
    "alignlab.algorithms.online_preference.online_dpo",
    "alignlab.algorithms.online_preference.iterative_dpo",
    "alignlab.algorithms.online_preference.xpo",
    "alignlab.algorithms.online_preference.nash_md",
    "alignlab.algorithms.online_preference.sppo",
    "alignlab.algorithms.online_preference.p3o",
    "alignlab.algorithms.online_preference.selm",
    "alignlab.algorithms.online_preference.vpo",
    "alignlab.algorithms.online_preference.inpo",
    "alignlab.algorithms.online_preference.dno",
    "alignlab.algorithms.online_preference.egpo",
))
