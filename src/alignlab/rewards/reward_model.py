"""Scoring text with a trained reward model or an ensemble of them.

An ensemble is K reward columns: K heads on one backbone (``num_heads=K``), K separate models
(``member_0/``, ``member_1/``, … next to a ``reward_model.json``), or both. Its scalar reward
aggregates the columns (Coste et al. 2024, "Reward model ensembles help mitigate
overoptimization"; Eisenstein et al. 2023, "Helping or herding? Reward model ensembles mitigate
but do not eliminate reward hacking"):

- ``mean``: ``mean_k r_k``;
- ``min``: ``min_k r_k`` (worst-case optimisation);
- ``mean_minus_std``: ``mean_k r_k − λ·std_k r_k`` (population std; uncertainty-weighted).

Registered in the reward registry as ``reward_model`` (``get_reward("reward_model",
path="runs/rm/final", aggregate="min")``).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignlab.core.errors import ConfigError
from alignlab.models.fingerprint import memoized_fingerprint
from alignlab.rewards.registry import REWARDS, completion_text

AGGREGATIONS = ("mean", "min", "mean_minus_std")
ENSEMBLE_CONFIG = "reward_model.json"


def aggregate_rewards(rewards: Tensor, aggregate: str = "mean", std_coef: float = 1.0) -> Tensor:
    """``[N, K]`` member rewards → ``[N]`` (see the module docstring); ``[N]`` passes through."""
    if rewards.ndim == 1:
        return rewards
    if aggregate == "mean":
        return rewards.mean(-1)
    if aggregate == "min":
        return rewards.min(-1).values
    if aggregate == "mean_minus_std":
        return rewards.mean(-1) - std_coef * rewards.std(-1, correction=0)
    raise ConfigError(f"unknown reward aggregate {aggregate!r}; allowed values: "
                      f"{', '.join(AGGREGATIONS)}")


class RewardEnsemble(nn.Module):
    """One or more scalar-head reward models read as K reward columns."""

    def __init__(self, members: list[nn.Module], aggregate: str = "mean",
                 std_coef: float = 1.0) -> None:
        super().__init__()
        if not members:
            raise ConfigError("a reward ensemble needs at least one member")
        aggregate_rewards(torch.zeros(1, 1), aggregate)  # fail early on an unknown name
        self.members = nn.ModuleList(members)
        self.aggregate, self.std_coef = aggregate, std_coef

    @property
    def size(self) -> int:
        return sum(m.num_heads for m in self.members)

    def member_rewards(self, batch: dict[str, Any]) -> Tensor:
        """Reward at each sequence's last token, one column per head of every member: ``[S, K]``."""
        columns = [m.sequence_values(batch) for m in self.members]
        return torch.cat([c[:, None] if c.ndim == 1 else c for c in columns], dim=-1)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """The aggregated reward ``[S]``."""
        return aggregate_rewards(self.member_rewards(batch), self.aggregate, self.std_coef)

    def save_pretrained(self, directory: str | os.PathLike, *, pad_token_id: int | None = None,
                        state_dicts: list[dict[str, Tensor] | None] | None = None) -> None:
        """One member: its own layout; several: ``member_i/`` each. Plus ``reward_model.json``.
        ``state_dicts``: each member's full weights to write (None: its own), for members
        sharded by FSDP2."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        states = state_dicts or [None] * len(self.members)
        for i, (member, state) in enumerate(zip(self.members, states, strict=True)):
            where = out if len(self.members) == 1 else out / f"member_{i}"
            member.save_pretrained(where, pad_token_id=pad_token_id,
                                   **({} if state is None else {"state_dict": state}))
        meta = {"members": len(self.members), "num_heads": [m.num_heads for m in self.members],
                "aggregate": self.aggregate, "std_coef": self.std_coef}
        (out / ENSEMBLE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, aggregate: str | None = None,
                        std_coef: float | None = None, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cpu",
                        trust_remote_code: bool = False) -> "RewardEnsemble":
        """Load what ``save_pretrained`` wrote, or any single reward model ``load_reward_model``
        reads (scalar-head or ``*ForSequenceClassification``). Frozen, eval mode."""
        from alignlab.models.heads import load_reward_model

        root = Path(directory).expanduser()
        meta = json.loads((root / ENSEMBLE_CONFIG).read_text()) if (root / ENSEMBLE_CONFIG).is_file() else {}
        n = int(meta.get("members", 1))
        # One member may also be a Hub name of a *ForSequenceClassification reward model.
        paths = [str(directory)] if n == 1 else [root / f"member_{i}" for i in range(n)]
        missing = [str(p) for p in paths if n > 1 and not Path(p).is_dir()]
        if missing:
            raise ConfigError(f"reward ensemble {root}: {ENSEMBLE_CONFIG} lists {n} members but "
                              f"{missing[0]} is missing")
        members = [load_reward_model(str(p), dtype=dtype,
                                     device=device, trust_remote_code=trust_remote_code)
                   for p in paths]
        return cls(members, aggregate or meta.get("aggregate", "mean"),
                   meta.get("std_coef", 1.0) if std_coef is None else std_coef)


@dataclass
class EnsembleScores:
    """Aggregated rewards and each member's rewards (``members[i][k]``: completion i, member k)."""

    rewards: list[float]
    members: list[list[float]]


def scored_completion(completion: str) -> str:
    """The completion as the reward model was trained on it: up to ``END``, markers removed,
    its leading space kept (byte-level BPE tokenises ``" good"`` and ``"good"`` differently)."""
    text = completion_text(completion)
    return " " + text if text and completion[:1].isspace() else text


class RewardModelScorer:
    """Score ``(prompt, completion)`` texts with a reward ensemble, in batches, without gradients.

    Texts are tokenised exactly as the trainer tokenised prompt/completion rows (prompt, then
    completion + eos), truncated to ``max_length`` by keeping the end of the prompt.
    """

    def __init__(self, ensemble: RewardEnsemble, tokenizer: Any, *, batch_size: int = 32,
                 max_length: int | None = 512) -> None:
        self.ensemble, self.tokenizer = ensemble, tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, aggregate: str | None = None,
                        std_coef: float | None = None, device: str = "cpu",
                        batch_size: int = 32, max_length: int | None = 512) -> "RewardModelScorer":
        from alignlab.core.runtime import pick_device
        from alignlab.models.loading import load_tokenizer

        root = Path(path).expanduser()
        ensemble = RewardEnsemble.from_pretrained(root, aggregate=aggregate, std_coef=std_coef,
                                                  device=pick_device(device))
        tok_dir = root / "member_0" if (root / "member_0").is_dir() else path
        return cls(ensemble, load_tokenizer(str(tok_dir)), batch_size=batch_size,
                   max_length=max_length)

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> EnsembleScores:
        from alignlab.core.runtime import to_device
        from alignlab.data.collate import pad_collate
        from alignlab.data.loading import RowSet
        from alignlab.data.tokenize import tokenize_rows

        # Rows are built directly (not validated): a generated completion may be empty.
        rows = RowSet("prompt_completion", [{"prompt": p, "completion": scored_completion(c)}
                                            for p, c in zip(prompts, completions)], "<scored>")
        tokenized = tokenize_rows(rows, self.tokenizer, max_length=self.max_length,
                                  truncation="keep_end_of_prompt")
        device = next(self.ensemble.parameters()).device
        was_training = self.ensemble.training
        self.ensemble.eval()
        columns = []
        try:
            for start in range(0, len(tokenized.examples), self.batch_size):
                chunk = tokenized.examples[start:start + self.batch_size]
                batch = to_device(pad_collate(chunk, tokenized.pad_token_id), device)
                columns.append(self.ensemble.member_rewards(batch).float().cpu())
        finally:
            self.ensemble.train(was_training)
        members = torch.cat(columns) if columns else torch.zeros(0, self.ensemble.size)
        agg = aggregate_rewards(members, self.ensemble.aggregate, self.ensemble.std_coef)
        return EnsembleScores(agg.tolist(), members.tolist())

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        return self.score(prompts, completions).rewards


@functools.lru_cache(maxsize=4)
def _cached_scorer(path: str, aggregate: str | None, std_coef: float | None, device: str,
                   batch_size: int, max_length: int | None,
                   fingerprint: str | None) -> RewardModelScorer:
    # ``fingerprint`` (the content of the weights, configs and tokenizer, members included) is
    # part of the key, so a model re-saved at the same path is reloaded, whatever its mtime.
    return RewardModelScorer.from_pretrained(path, aggregate=aggregate, std_coef=std_coef,
                                             device=device, batch_size=batch_size,
                                             max_length=max_length)


def load_scorer(path: str | os.PathLike, *, aggregate: str | None = None,
                std_coef: float | None = None, device: str = "cpu", batch_size: int = 32,
                max_length: int | None = 512) -> RewardModelScorer:
    """A (cached) scorer for the reward model or ensemble saved at ``path``."""
    root = Path(path).expanduser()
    key = str(root.resolve()) if root.is_dir() else str(path)  # else: a Hub name
    return _cached_scorer(key, aggregate, std_coef, device, batch_size, max_length,
                          memoized_fingerprint(root, recursive=True))


@REWARDS.register("reward_model")
def reward_model(prompts: list[str], completions: list[str], *, path: str,
                 aggregate: str | None = None, std_coef: float | None = None,
                 device: str = "cpu", batch_size: int = 32, **fields: Any) -> list[float]:
    """A trained reward model or ensemble (``path``), aggregated by mean, min or mean − λ·std."""
    scorer = load_scorer(path, aggregate=aggregate, std_coef=std_coef, device=device,
                         batch_size=batch_size)
    return scorer(prompts, completions)


def _check_reward_model_params(*, path: str | None = None, aggregate: str | None = None,
                               std_coef: float | None = None, **_: Any) -> None:
    """Fail before training starts: no ``path``, a local one that is missing, a bad aggregate.

    A ``path`` that does not exist here may still be a Hub name (``org/name``); one that starts
    with ``.``, ``/`` or ``~`` or has two slashes or more is taken as a missing local folder."""
    if not path:
        raise ConfigError("'path' is required: the reward model or ensemble folder "
                          "(`alignlab train reward` writes <output_dir>/final)")
    local = str(path).startswith((".", "/", "~")) or str(path).count("/") >= 2
    if local and not Path(path).expanduser().is_dir():
        raise ConfigError(f"path {path!r} is not a folder")
    if aggregate is not None and aggregate not in AGGREGATIONS:
        raise ConfigError(f"aggregate {aggregate!r}; allowed values: {', '.join(AGGREGATIONS)}")
    if std_coef is not None and not std_coef >= 0:
        raise ConfigError(f"std_coef must be >= 0, got {std_coef!r}")


reward_model.check_params = _check_reward_model_params  # type: ignore[attr-defined]


__all__ = ["AGGREGATIONS", "aggregate_rewards", "RewardEnsemble", "EnsembleScores",
           "RewardModelScorer", "load_scorer", "reward_model", "scored_completion"]
