"""A trained general pairwise preference model as the judge (``rewards/preference_model.py``;
Munos et al. 2023, "Nash Learning from Human Feedback"; Dong et al. 2024, "RLHF Workflow").

The model reads the prompt and both responses in one sequence and gives ``P_first``, the
probability that the response shown first wins. With ``debias`` (default) every pair is read in
both orders and ``P(a ≻ b) = (P_first(a, b) + 1 − P_first(b, a)) / 2``, so swapping a and b
gives exactly ``1 − P`` and two identical responses give ½ (a tie); without it, ``P_first(a, b)``.

Texts are tokenised as the trainer tokenised preference rows (prompt, then each response + eos,
``END`` markers removed as for reward models) and joined with the model's own markers and
length limit (``preference_model.json``). Both orders of a pair go in the same batch. Verdicts
are cached (``cache.py``) under the model's content fingerprint, its pair format and
``debias``: a second call on the same pairs does not run the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from alignlab.core.errors import ConfigError
from alignlab.models.fingerprint import directory_fingerprint, module_fingerprint
from alignlab.rewards.judges.base import Verdict, swap_debiased_verdict
from alignlab.rewards.judges.cache import VerdictCache, verdict_key
from alignlab.rewards.preference_model import PairEncoder, PairwisePreferenceModel, first_wins


class PreferenceModelJudge:
    """``P(a ≻ b)`` from a pairwise preference model (see the module docstring); a
    ``PairwiseJudge``."""

    def __init__(self, model: PairwisePreferenceModel, tokenizer: Any, *, debias: bool = True,
                 batch_size: int = 16, fingerprint: str | None = None,
                 cache_path: str | Path | None = None) -> None:
        from alignlab.data.tokenize import resolve_pad_token_id

        if batch_size < 1:
            raise ConfigError(f"preference-model judge batch_size must be positive, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.debias, self.batch_size = debias, batch_size
        self.encoder = PairEncoder(tokenizer, model.format)
        self.pad = resolve_pad_token_id(tokenizer)[0]
        self.fingerprint = fingerprint or module_fingerprint(model)
        self.cache = VerdictCache(cache_path)
        self.identity = {"judge": "preference_model", "model": self.fingerprint,
                         "format": asdict(model.format), "debias": debias}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str = "auto",
                        device: str | torch.device = "cpu", **kwargs: Any) -> PreferenceModelJudge:
        """A judge from the folder ``alignlab train preference_model`` wrote (``final/``),
        fingerprinted by its files' bytes."""
        from alignlab.models.loading import freeze, load_tokenizer

        model = freeze(PairwisePreferenceModel.from_pretrained(path, dtype=dtype, device=device))
        return cls(model, load_tokenizer(str(path)), fingerprint=directory_fingerprint(path),
                   **kwargs)

    # ---- the PairwiseJudge interface --------------------------------------------------------

    def cached(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[bool]:
        """Whether each pair's verdict is already cached (judging it would not run the model)."""
        return [self._key(p, x, y) in self.cache for p, x, y in zip(prompts, a, b)]

    def judge(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        if not len(prompts) == len(a) == len(b):
            raise ConfigError(f"preference-model judge: {len(prompts)} prompts, {len(a)} a, "
                              f"{len(b)} b")
        keys = [self._key(p, x, y) for p, x, y in zip(prompts, a, b)]
        return self.cache.lookup(keys, lambda idx: self._judge([prompts[i] for i in idx],
                                                               [a[i] for i in idx],
                                                               [b[i] for i in idx]))

    def counters(self) -> dict[str, int]:
        return self.cache.counters()

    def load_counters(self, state: dict[str, int]) -> None:
        self.cache.load_counters(state)

    # ---- one model pass over the pairs not cached ------------------------------------------

    def _key(self, prompt: str, a: str, b: str) -> str:
        return verdict_key(self.identity, prompt, a, b)

    def _judge(self, prompts: list[str], a: list[str], b: list[str]) -> list[Verdict]:
        sequences = []
        for i, (prompt, first, second) in enumerate(zip(*self._tokenize(prompts, a, b))):
            orders = self.encoder.both_orders(prompt, first, second)
            if orders is None:
                raise ConfigError(f"preference-model judge: pair {i} does not fit the model's "
                                  f"max_length {self.model.format.max_length} with one token "
                                  "of each response")
            sequences += orders if self.debias else orders[:1]
        p = first_wins(self.model, sequences, self.pad, self.batch_size).tolist()
        if not self.debias:
            return [swap_debiased_verdict(x, None) for x in p]
        return [swap_debiased_verdict(p[2 * i], p[2 * i + 1]) for i in range(len(prompts))]

    def _tokenize(self, prompts: list[str], a: list[str], b: list[str]
                  ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        from alignlab.data.loading import RowSet
        from alignlab.data.tokenize import tokenize_rows
        from alignlab.rewards.reward_model import scored_completion

        # Rows are built directly (not validated): a generated completion may be empty.
        rows = RowSet("preference", [{"prompt": p, "chosen": scored_completion(x),
                                      "rejected": scored_completion(y)}
                                     for p, x, y in zip(prompts, a, b)], "<judged>")
        examples = tokenize_rows(rows, self.tokenizer, max_length=None).examples
        return ([e["prompt_ids"] for e in examples], [e["chosen_ids"] for e in examples],
                [e["rejected_ids"] for e in examples])


__all__ = ["PreferenceModelJudge"]
