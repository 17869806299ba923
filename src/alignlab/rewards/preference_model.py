"""A general pairwise preference model: ``P(a ≻ b | x)`` from one pass over the prompt and *both*
responses, so it need not come from a score per response and can represent non-transitive
preferences (a ≻ b ≻ c ≻ a), which no Bradley-Terry reward can.

Munos et al. 2023, "Nash Learning from Human Feedback" (§3: a preference model conditioned on
two responses, learnt from pairwise human feedback, then the Nash equilibrium of it); Dong et al.
2024, "RLHF Workflow: From Reward Modeling to Online RLHF" (the pairwise preference model of
their online iterative RLHF). The input is one sequence,

    prompt ‖ a_marker ‖ first response (+eos) ‖ b_marker ‖ second response (+eos),

and a scalar head on a causal-LM backbone reads its last token: ``s(x, y₁, y₂)``,
``P_first(y₁ ≻ y₂) = σ(s)``. Nothing in the network makes ``s(x, a, b) = −s(x, b, a)``: the
trainer learns both orders of every pair (binary cross-entropy, ``losses.reward.
preference_model_bce``), and the judge reads the position-swap average

    P(a ≻ b) = (σ(s(x, a, b)) + 1 − σ(s(x, b, a))) / 2,

so ``P(a ≻ b) = 1 − P(b ≻ a)`` holds exactly and two identical responses get ½.

Deviation from RLHF Workflow: its model reads the next-token probabilities of the labels "A"
and "B" after the pair; here a scalar head (as PairRM, Jiang et al. 2023, "LLM-Blender", and
alignlab's reward models) gives the logit directly, with no label tokens in the vocabulary.

Over-long pairs are cut to ``max_length`` tokens: ``keep_end_of_prompt`` drops prompt tokens
from the left (a leading bos kept) down to one token, then both responses share what is left;
``truncate_completion`` cuts the responses first and the prompt only when they would keep less
than one token each. Both responses get the same room, so a swapped pair is cut the same way.

On disk (``save_pretrained``): the scalar-head checkpoint (the ``XForSequenceClassification``
layout, safetensors; ``models/heads.py``) and ``preference_model.json`` (the markers, the length
limit and the truncation policy), read back by ``from_pretrained``; no pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignlab.core.errors import ConfigError

PREFERENCE_MODEL_CONFIG = "preference_model.json"
_FORMAT = "alignlab.pairwise_preference_model"
TRUNCATIONS = ("keep_end_of_prompt", "truncate_completion")


@dataclass(frozen=True)
class PairFormat:
    """How a pair becomes one sequence (see the module docstring)."""

    a_marker: str = "\n[A]"
    """Text between the prompt and the first response."""
    b_marker: str = "\n[B]"
    """Text between the first and the second response."""
    max_length: int | None = 512
    """Tokens of the joined sequence; None: no limit."""
    truncation: str = "keep_end_of_prompt"

    def __post_init__(self) -> None:
        if not self.a_marker or not self.b_marker or self.a_marker == self.b_marker:
            raise ConfigError(f"the pair markers must be two different non-empty strings, got "
                              f"{self.a_marker!r} and {self.b_marker!r}")
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(f"pair truncation {self.truncation!r}; allowed values: "
                              f"{', '.join(TRUNCATIONS)}")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"pair max_length must be positive, got {self.max_length}")


class PairEncoder:
    """Joins tokenised (prompt, first, second) into one example of the preference model."""

    def __init__(self, tokenizer: Any, fmt: PairFormat) -> None:
        self.tokenizer, self.format = tokenizer, fmt
        self.markers = [list(tokenizer(m, add_special_tokens=False)["input_ids"])
                        for m in (fmt.a_marker, fmt.b_marker)]
        if not all(self.markers):
            raise ConfigError(f"the pair markers {fmt.a_marker!r}, {fmt.b_marker!r} tokenize "
                              f"to {self.markers}; each needs at least one token")
        self.bos = tokenizer.bos_token_id

    @property
    def overhead(self) -> int:
        return sum(map(len, self.markers))

    def join(self, prompt: Sequence[int], first: Sequence[int], second: Sequence[int]
             ) -> dict[str, list[int]] | None:
        """``input_ids`` and a ``loss_mask`` that is 0 on the prompt and 1 after it (the shape
        of a prompt + completion row, so rows that share a prompt can share its pass); None
        when ``max_length`` leaves no room for one token of each response."""
        fitted = self._fit(list(prompt), list(first), list(second))
        if fitted is None:
            return None
        prompt, first, second = fitted
        a_marker, b_marker = self.markers
        rest = [*a_marker, *first, *b_marker, *second]
        return {"input_ids": prompt + rest, "loss_mask": [0] * len(prompt) + [1] * len(rest)}

    def both_orders(self, prompt: Sequence[int], a: Sequence[int], b: Sequence[int]
                    ) -> tuple[dict[str, list[int]], dict[str, list[int]]] | None:
        """(a shown first, b shown first); None when the pair does not fit (see ``join``)."""
        ab, ba = self.join(prompt, a, b), self.join(prompt, b, a)
        return None if ab is None or ba is None else (ab, ba)

    def fits(self, prompt: Sequence[int], a: Sequence[int], b: Sequence[int]) -> bool:
        """Whether the pair fits ``max_length`` uncut."""
        limit = self.format.max_length
        return limit is None or len(prompt) + len(a) + len(b) + self.overhead <= limit

    def _fit(self, prompt: list[int], first: list[int], second: list[int]
             ) -> tuple[list[int], list[int], list[int]] | None:
        if self.fits(prompt, first, second):
            return prompt, first, second
        room = self.format.max_length - self.overhead  # for the prompt and the responses
        if self.format.truncation == "keep_end_of_prompt":
            prompt = self._left(prompt, max(room - len(first) - len(second), 1))
        elif room - len(prompt) < 2:
            prompt = self._left(prompt, room - 2)
        share = room - len(prompt)
        if share < 2:
            return None
        cut = _equal_room(len(first), len(second), share)
        return prompt, first[:cut], second[:cut]

    def _left(self, ids: list[int], n: int) -> list[int]:
        """The last ``n`` tokens (``n`` ≥ 0), a leading bos kept."""
        if n <= 0:
            return []
        if len(ids) <= n:
            return ids
        if self.bos is not None and ids[0] == self.bos and n >= 2:
            return ids[:1] + ids[len(ids) - n + 1:]
        return ids[len(ids) - n:]


def _equal_room(n_first: int, n_second: int, room: int) -> int:
    """The most tokens each response may keep so both fit in ``room``, the same for both (so
    the swapped pair is cut alike): a short response leaves its unused share to the other."""
    if n_first + n_second <= room:
        return max(n_first, n_second)
    short = min(n_first, n_second)
    return room - short if short <= room // 2 else room // 2


class PairwisePreferenceModel(nn.Module):
    """A scalar-head causal LM read as ``s(x, first, second)`` (see the module docstring)."""

    saves_own_adapters = True  # the scorer's save_pretrained writes a LoRA body's adapters

    def __init__(self, scorer: nn.Module, fmt: PairFormat = PairFormat()) -> None:
        super().__init__()
        if getattr(scorer, "num_heads", 1) != 1:
            raise ConfigError(f"a pairwise preference model has one head, got {scorer.num_heads}")
        self.scorer, self.format = scorer, fmt

    def logits(self, batch: dict[str, Any]) -> Tensor:
        """``s`` of every sequence of a batch of joined pairs: ``[S]``, float32."""
        return self.scorer.sequence_values(batch)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """:meth:`logits` as the module's own forward: what FSDP2 and ZeRO-3 gather the root's
        weights in, so training calls ``model(batch)``."""
        return self.logits(batch)

    def save_pretrained(self, directory: str | os.PathLike, *, pad_token_id: int | None = None,
                        state_dict: dict[str, Tensor] | None = None) -> None:
        """The scorer's layout and the pair format; ``state_dict``: this module's full weights
        to write instead of its own (a sharded model's, gathered)."""
        out = Path(directory)
        inner = None if state_dict is None else {
            k.removeprefix("scorer."): v for k, v in state_dict.items()}
        self.scorer.save_pretrained(out, pad_token_id=pad_token_id, state_dict=inner)
        meta = {"format": _FORMAT, "version": 1, **asdict(self.format)}
        (out / PREFERENCE_MODEL_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cpu", trust_remote_code: bool = False,
                        attn_implementation: str | None = None) -> PairwisePreferenceModel:
        """What ``save_pretrained`` wrote (trainable, train mode; the judge freezes it)."""
        from alignlab.models.heads import CausalLMWithScalarHead

        scorer = CausalLMWithScalarHead.from_pretrained(
            directory, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation)
        return cls(scorer, read_pair_format(directory))

    @classmethod
    def from_causal_lm(cls, name_or_path: str | os.PathLike, fmt: PairFormat, *,
                       dtype: str | torch.dtype = "auto", trust_remote_code: bool = False,
                       attn_implementation: str | None = None) -> PairwisePreferenceModel:
        """A fresh head (with a bias: the logit of a first-shown win) on a causal LM's body."""
        from alignlab.models.heads import CausalLMWithScalarHead

        scorer = CausalLMWithScalarHead.from_causal_lm(
            name_or_path, num_heads=1, bias=True, dtype=dtype,
            trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
        return cls(scorer, fmt)


def is_preference_model(directory: str | os.PathLike) -> bool:
    return (Path(directory).expanduser() / PREFERENCE_MODEL_CONFIG).is_file()


def read_pair_format(directory: str | os.PathLike) -> PairFormat:
    path = Path(directory).expanduser() / PREFERENCE_MODEL_CONFIG
    if not path.is_file():
        raise ConfigError(f"'{directory}' is not a pairwise preference model: no "
                          f"{PREFERENCE_MODEL_CONFIG} (`alignlab train preference_model` writes "
                          "<output_dir>/final)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != _FORMAT:
        raise ConfigError(f"{path}: unknown format {meta.get('format')!r}")
    return PairFormat(a_marker=meta["a_marker"], b_marker=meta["b_marker"],
                      max_length=meta["max_length"], truncation=meta["truncation"])


@torch.no_grad()
def first_wins(model: PairwisePreferenceModel, sequences: Sequence[dict[str, list[int]]],
               pad_token_id: int, batch_size: int = 32) -> Tensor:
    """``σ(s)`` of each joined sequence (``PairEncoder.join``), in batches, in eval mode (a
    model that was training goes back to it): ``[N]`` on the CPU, float32."""
    from alignlab.data.collate import pad_collate

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            batch = {k: v.to(device) for k, v in pad_collate(chunk, pad_token_id).items()}
            out.append(torch.sigmoid(model.logits(batch).float()).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def swap_average(p_ab: Tensor, p_ba: Tensor) -> Tensor:
    """``P(a ≻ b) = (P_first(a, b) + 1 − P_first(b, a)) / 2``."""
    return (p_ab + 1 - p_ba) / 2


__all__ = ["PREFERENCE_MODEL_CONFIG", "PairEncoder", "PairFormat", "PairwisePreferenceModel",
           "TRUNCATIONS", "first_wins", "is_preference_model", "read_pair_format", "swap_average"]
