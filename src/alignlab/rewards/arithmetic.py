"""Verifier for the world's addition problems."""

from __future__ import annotations

import re

from alignlab.rewards.registry import REWARDS, completion_text

_PROBLEM = re.compile(r"(-?\d+)\s*\+\s*(-?\d+)")
_INTEGER = re.compile(r"-?\d+")


def problem_sum(prompt: str) -> int | None:
    """The true sum of the last ``a + b`` in the prompt, or None if it has none."""
    matches = _PROBLEM.findall(prompt)
    if not matches:
        return None
    a, b = matches[-1]
    return int(a) + int(b)


def parse_answer(completion: str) -> int | None:
    """The first integer of the completion (prompts end with ``answer :``), or None."""
    match = _INTEGER.search(completion_text(completion))
    return int(match.group()) if match else None


@REWARDS.register("arithmetic_exact")
def arithmetic_exact(prompts: list[str], completions: list[str], *, answer=None,
                     **fields) -> list[float]:
    """1.0 if the completion's first integer equals the true sum, else 0.0 (unparsable → 0).

    The true sum is the row's ``answer`` field when given, else computed from the prompt.
    """
    truths = answer if answer is not None else [problem_sum(p) for p in prompts]
    scores = []
    for truth, completion in zip(truths, completions, strict=True):
        got = parse_answer(completion)
        scores.append(float(truth is not None and got is not None and got == int(truth)))
    return scores
