"""``ALGORITHMS``: every trainer ``alignlab train <name>`` can run, with its config class."""

from __future__ import annotations

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


def _register_builtin() -> None:
    from alignlab.trainers.sft import SFTConfig, run_sft

    ALGORITHMS.register("sft")(AlgorithmEntry(SFTConfig, run_sft, "Supervised fine-tuning on demonstrations "
                                              "(completion-only or full-sequence, packing)."))


_register_builtin()
