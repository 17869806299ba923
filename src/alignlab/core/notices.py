"""One warning per cause: the first occurrence is shown, later ones are only counted.

A condition that holds for many iterations (most completions cut at ``max_new_tokens``, reward
calls failing and skipped) would otherwise print one warning per iteration. ``warn_once`` shows
the first with its cause, counts the rest, and ``TrainingRun.close`` prints one summary line per
repeated cause (``repeated()``); each run starts afresh (``reset()``). The per-iteration values
are in the metrics (``frac_hit_length_limit``, ``reward_skipped``) either way.
"""

from __future__ import annotations

import warnings

from alignlab.core.errors import AlignlabWarning

_counts: dict[str, int] = {}


def warn_once(cause: str, message: str, *, stacklevel: int = 2) -> None:
    """Warn with ``message`` the first time ``cause`` occurs in this run; count the others."""
    seen = _counts.get(cause, 0)
    _counts[cause] = seen + 1
    if seen == 0:
        warnings.warn(message, AlignlabWarning, stacklevel=stacklevel + 1)


def repeated() -> dict[str, int]:
    """Causes that occurred more than once, with how many times after the first."""
    return {cause: n - 1 for cause, n in _counts.items() if n > 1}


def reset() -> None:
    _counts.clear()


__all__ = ["repeated", "reset", "warn_once"]
