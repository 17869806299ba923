"""Verifiable rewards that execute the model's code, in the sandbox (``rewards/sandbox.py``)."""

from __future__ import annotations

import os
import re
import textwrap
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from alignlab.core.errors import ConfigError, RewardError
from alignlab.rewards import RewardValues
from alignlab.rewards.registry import REWARDS, completion_text
from alignlab.rewards.sandbox import Limits, SandboxResult, run_code

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = {"python", "python3", "py", ""}


def extract_program(completion: str) -> str:
    """The first ```python (or untagged) fenced block of the completion, else its whole text.

    The completion is first cut at its end marker (``completion_text``); an unclosed fence runs
    to the end (a completion cut by the token limit); the block is dedented.
    """
    text = completion_text(completion)
    for match in _FENCE.finditer(text):
        if match.group(1).lower() in _PYTHON_TAGS:
            return textwrap.dedent(match.group(2))
    return text


def same_output(got: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing blank lines."""
    def norm(s: str) -> list[str]:
        return [line.rstrip() for line in s.rstrip().splitlines()]

    return norm(got) == norm(expected)


@REWARDS.register("python_output")
def python_output(prompts: list[str], completions: list[str], *, expected_output=None,
                  stdin=None, timeout_s: float = 5.0, memory_mb: int | None = 256,
                  workers: int = 2, **fields) -> RewardValues:
    """1.0 if the completion's Python program, run sandboxed, prints the row's expected_output.

    The program is :func:`extract_program` of the completion; it runs with ``python -I`` in a
    fresh temp dir, the row's ``stdin`` field (if any) as its input, killed after ``timeout_s``
    wall-clock seconds and limited to ``memory_mb`` MiB of address space. Anything but a clean
    exit with matching stdout (:func:`same_output`) scores 0.0: a wrong answer, an exception, a
    timeout, a memory blow-up or too much output. How many rows ended each way is reported as
    metrics ``pass``, ``wrong``, ``error``, ``timeout``, ``memory``, ``output_limit``.
    ``workers`` programs run at once.
    """
    if expected_output is None:
        raise ConfigError("python_output needs an 'expected_output' column in the prompt rows "
                          "(rollout.prompts: a JSONL/Parquet file with that field)")
    _check_params(timeout_s=timeout_s, memory_mb=memory_mb, workers=workers)
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb)
    inputs = stdin if stdin is not None else [None] * len(completions)
    missing = [i for i, e in enumerate(expected_output) if e is None]
    if missing:
        raise RewardError(f"python_output: rows {missing[:5]} have no expected_output")

    def run(i: int) -> SandboxResult:
        return run_code(extract_program(completions[i]), limits, stdin=inputs[i])

    with ThreadPoolExecutor(max_workers=min(workers, os.cpu_count() or 1, len(completions) or 1)) as pool:
        results = list(pool.map(run, range(len(completions))))
    counts = Counter({k: 0 for k in ("pass", "wrong", "error", "timeout", "memory", "output_limit")})
    scores = []
    for res, expected in zip(results, expected_output, strict=True):
        passed = res.ok and same_output(res.stdout, str(expected))
        counts["pass" if passed else "wrong" if res.ok else res.status] += 1
        scores.append(float(passed))
    return RewardValues(scores, counts)


def _check_params(*, timeout_s: float = 5.0, memory_mb: int | None = 256, workers: int = 2,
                  **_) -> None:
    Limits(timeout_s=timeout_s, memory_mb=memory_mb)
    if not (isinstance(workers, int) and workers >= 1):
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")


python_output.check_params = _check_params  # type: ignore[attr-defined]
