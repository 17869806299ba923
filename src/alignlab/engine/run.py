"""The run directory of one training, written once for the offline loop and the online controller.

``TrainingRun`` owns what every trainer repeats around its steps: resuming from the latest
checkpoint, the metrics sinks (JSONL, TensorBoard), the progress bar, periodic atomic
checkpoints (``checkpoint.py``) and the ``DONE`` marker. A trainer gives it its model and a
callable returning the rest of its state; the state's layout is the trainer's business.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alignlab.core.config import TrainSection
from alignlab.core.io import atomic_write_text
from alignlab.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignlab.engine.metrics import MetricsLogger
from alignlab.engine.progress import Progress


class TrainingRun:
    """``resume`` → ``open`` → ``step_done`` once per step → ``close`` → ``finish``."""

    def __init__(self, cfg: TrainSection, model: torch.nn.Module, description: str) -> None:
        self.cfg, self.model, self.description = cfg, model, description
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.logger: MetricsLogger | None = None
        self.progress: Progress | None = None

    def resume(self) -> tuple[int, dict[str, Any] | None]:
        """``(step, trainer state)`` of the latest checkpoint when ``train.resume`` is set (its
        weights loaded into the model and the RNG states restored), else ``(0, None)``."""
        ckpt = latest_checkpoint(self.output_dir) if self.cfg.resume else None
        if ckpt is None:
            return 0, None
        state = load_checkpoint(ckpt, self.model)
        return int(state["step"]), state

    def open(self, start_step: int) -> TrainingRun:
        self.logger = MetricsLogger(self.output_dir, tensorboard=self.cfg.tensorboard)
        self.progress = Progress(self.cfg.max_steps, start_step, self.cfg.progress, self.description)
        return self

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.logger.history if self.logger is not None else []

    def step_done(self, step: int, metrics: dict[str, Any], info: str,
                  state: Callable[[], dict[str, Any]]) -> None:
        """Log ``metrics`` every ``log_every`` steps and at the end; checkpoint every
        ``save_every`` steps and at the end (``state()`` is called only then)."""
        last = step == self.cfg.max_steps
        if step % self.cfg.log_every == 0 or last:
            self.logger.log(step, metrics)
        self.progress.update(info)
        if self.cfg.save_every and (step % self.cfg.save_every == 0 or last):
            save_checkpoint(self.output_dir, step, self.model, state(),
                            keep=self.cfg.save_total_limit)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.logger is not None:
            self.logger.close()

    def finish(self, step: int) -> None:
        atomic_write_text(self.output_dir / "DONE", f"{step}\n")

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
