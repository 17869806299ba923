"""Metrics sinks: one JSON object per line, TensorBoard scalars, and Weights & Biases.

W&B is optional (``train.report_to: [wandb]``): the run's id is kept in ``wandb_run_id`` in the
run directory, so a resumed run continues the same W&B run instead of starting a new one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from alignlab.core.errors import ConfigError


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True,
                 purge_step: int | None = None, wandb: bool = False,
                 config: dict[str, Any] | None = None) -> None:
        """``purge_step``: a resumed run's first step; TensorBoard drops the earlier run's events
        from that step on (they were logged after the checkpoint the run resumed from).
        ``config``: the run's config, recorded by W&B."""
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"), purge_step=purge_step)
        self._wandb = open_wandb(self.dir, config) if wandb else None
        self.history: list[dict[str, Any]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k not in ("step", "time")},
                            step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class MemoryLogger:
    """``MetricsLogger``'s history without its files: the logger of ranks other than 0."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append({"step": step, "time": round(time.time(), 3),
                             **{k: _plain(v) for k, v in metrics.items()}})

    def close(self) -> None:
        """Nothing to close."""


def open_wandb(run_dir: Path, config: dict[str, Any] | None) -> Any:
    """A W&B run logging to ``run_dir/wandb``, resuming the one this directory started."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("field 'train.report_to': 'wandb' needs the wandb package "
                          "(pip install wandb)") from None
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.exists() else None
    run = wandb.init(dir=str(run_dir), name=run_dir.resolve().name, config=config or {},
                     id=run_id, resume="allow")
    if run_id is None:
        id_file.write_text(run.id + "\n", encoding="utf-8")
    return run


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return round(v, 6) if isinstance(v, float) else v
