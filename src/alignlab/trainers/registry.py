"""``ALGORITHMS``: every trainer ``alignlab train <name>`` can run, with its config class.

A trainer module registers itself at import (``ALGORITHMS.register("sft")(AlgorithmEntry(...))``)
and is listed once in ``BUILTIN_TRAINERS``; ``algorithms()`` imports them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from alignlab.registry import Registry


@dataclass(frozen=True)
class AlgorithmEntry:
    """A trainer: its typed config and the function that runs it."""

    config_cls: type[BaseModel]
    run: Callable[[Any], Any]
    doc: str

    @property
    def __doc__(self) -> str:  # shown by ``alignlab list algorithms -v``
        return self.doc


ALGORITHMS: Registry[AlgorithmEntry] = Registry("algorithm")

BUILTIN_TRAINERS = (
    "alignlab.trainers.sft",
    "alignlab.trainers.preference",
    "alignlab.trainers.reward",
    "alignlab.trainers.online",
)


def algorithms() -> Registry[AlgorithmEntry]:
    for module in BUILTIN_TRAINERS:
        importlib.import_module(module)
    return ALGORITHMS
