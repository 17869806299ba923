"""An on-disk cache of pairwise verdicts, so that no pair is labelled twice.

Judges whose labels cost something (a forward of an LLM judge, a draw of a simulated annotator
pool that stands in for paid annotators, AlpacaFarm: Dubois et al. 2023) keep their verdicts
here under ``sha256(json([version, identity, prompt, a, b]))``, where ``identity`` is everything
that decides the verdict besides the pair (the judge model's fingerprint, the template's
version, the annotator's settings, the seed). The file is JSONL — one
``{"key", "p_a", "a_preferred", "detail"}`` per line, appended as labels are made — and is read
back with ``json`` only (never pickle). A run killed mid-append leaves a partial last line;
that line is ignored and its pair labelled again.

``None`` verdicts (no label: a skipped, unparseable output) are not stored, so they are asked
again next time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignlab.rewards.judges.base import Verdict

CACHE_VERSION = 1


def verdict_key(identity: Any, prompt: str, a: str, b: str) -> str:
    """The cache key of judging (prompt, a, b) — in that order — by the judge ``identity``."""
    blob = json.dumps([CACHE_VERSION, identity, prompt, a, b], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class VerdictCache:
    """Verdicts by key, in memory and (with ``path``) in a JSONL file; counts hits and misses."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.hits = 0
        """Verdicts served from the cache (a repeat inside one call counts as a hit)."""
        self.misses = 0
        """Verdicts computed (what a budget counts as labels)."""
        self._store: dict[str, Verdict] = {}
        if self.path is not None and self.path.exists():
            self._store = _read(self.path)

    def __contains__(self, key: str) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def lookup(self, keys: Sequence[str],
               compute: Callable[[list[int]], Sequence[Verdict | None]]) -> list[Verdict | None]:
        """The verdict of every key; ``compute(indices)`` is called once with the indices (into
        ``keys``) of the first occurrence of each key not yet cached and returns their verdicts
        in that order."""
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in self._store and k not in first:
                first[k] = i
        fresh: dict[str, Verdict | None] = {}
        if first:
            verdicts = list(compute(list(first.values())))
            if len(verdicts) != len(first):
                raise RuntimeError(f"judge returned {len(verdicts)} verdicts for {len(first)} pairs")
            fresh = dict(zip(first, verdicts))
            new = {k: v for k, v in fresh.items() if v is not None}
            self._store.update(new)
            if self.path is not None and new:
                _append(self.path, new)
        self.misses += len(first)  # counted once computed: a call that raised labelled nothing
        self.hits += len(keys) - len(first)
        return [self._store[k] if k in self._store else fresh.get(k) for k in keys]

    def counters(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}

    def load_counters(self, state: dict[str, int]) -> None:
        self.hits, self.misses = int(state["hits"]), int(state["misses"])


def _read(path: Path) -> dict[str, Verdict]:
    store = {}
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
                store[entry["key"]] = Verdict(float(entry["p_a"]), entry["a_preferred"],
                                              entry.get("detail"))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return store


def _append(path: Path, new: dict[str, Verdict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps({"key": k, "p_a": v.p_a, "a_preferred": v.a_preferred,
                                    "detail": v.detail}, ensure_ascii=False) + "\n"
                        for k, v in new.items()))


__all__ = ["CACHE_VERSION", "VerdictCache", "verdict_key"]
