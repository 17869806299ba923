"""The user's own prompts, for ``alignlab generate`` (and evaluation on them).

Prompts are ``prompt_only`` rows (a JSONL/Parquet file, a ``datasets`` folder, or
``world:<task>`` for a task's eval prompts); a prompt given as a list of messages is rendered
with the tokenizer's chat template, and a row's extra columns reach the reward functions as
fields — both exactly as in online RL training (``algorithms/common.py``,
``policy_gradient/algorithm.py: judge``), so a reward scores the same here as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignlab.algorithms.common import render_chat_prompts
from alignlab.core.config import WorldSection
from alignlab.data.loading import load_rows
from alignlab.engine.prompts import PromptSource
from alignlab.world.resolve import is_world, world_task


@dataclass
class PromptRows:
    """Prompt rows as given (``prompt`` a string or a list of messages, extra columns kept)."""

    rows: list[dict[str, Any]]
    source: str
    task: Any = None
    """The world task of ``world:<task>`` (its ``gold`` reward and ``max_new_tokens``), else None."""


def read_prompt_rows(source: str, world: WorldSection, *, limit: int | None = None,
                     field: str = "--prompts") -> PromptRows:
    """``prompt_only`` rows from a file or folder (validated: a bad row is a ``DataError``
    naming file:line:field), or ``world:<task>``'s eval prompts; the first ``limit`` rows."""
    if is_world(source):
        task = world_task(source, world, field)
        return PromptRows([{"prompt": p} for p in task.eval_prompts[:limit]], source, task)
    rows = load_rows(source, format="prompt_only", limit=limit)
    return PromptRows([dict(r) for r in rows], rows.source)


def prompt_texts(rows: Sequence[dict[str, Any]], tokenizer: Any, field: str = "--prompts") -> list[str]:
    """The text the model continues for each row: a string prompt as is, a list of messages
    through the chat template with the generation prompt (what the RL trainers sample on)."""
    source = PromptSource([dict(r) for r in rows], seed=0)
    render_chat_prompts(source, tokenizer, field)
    return [r["prompt"] for r in source.rows]


__all__ = ["PromptRows", "prompt_texts", "read_prompt_rows"]
