"""The prompts of online training: a seeded, resumable stream of prompt rows."""

from __future__ import annotations

import random
from typing import Any

from alignlab.core.errors import ConfigError


class PromptSource:
    """Prompt rows (``prompt`` plus extra fields) for iteration ``i``: a fresh seeded permutation
    each pass over the rows, so iteration ``i``'s prompts depend only on ``i`` and the seed (a
    resumed run needs no saved position)."""

    def __init__(self, rows: list[dict[str, Any]], seed: int) -> None:
        if not rows:
            raise ConfigError("rollout.prompts: no prompts")
        self.rows, self.seed = rows, seed

    def batch(self, iteration: int, k: int) -> list[dict[str, Any]]:
        out, n = [], len(self.rows)
        for j in range(iteration * k, (iteration + 1) * k):
            order = list(range(n))
            random.Random(self.seed * 100_003 + j // n).shuffle(order)
            out.append(self.rows[order[j % n]])
        return out
