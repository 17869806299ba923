"""The run directory of one training, written once for the offline loop and the online controller.

``TrainingRun`` owns what every trainer repeats around its steps: resuming from the latest
checkpoint, the metrics sinks (JSONL, TensorBoard), the progress bar, periodic atomic
checkpoints (``checkpoint.py``), and a checkpoint on SIGINT/SIGTERM before stopping. A trainer
gives it its model and a callable returning the rest of its state; the state's layout is the
trainer's business. ``DONE`` is written by the trainer after its final model
(``algorithms/common.py: save_final``), so a run that died before it never looks finished.

``prepare_output_dir`` (through ``prepare_run``, which also writes ``config.yaml``) runs before
anything slow is loaded: a path that is a file or cannot be
written is refused at once, and so is a directory that holds an earlier run, unless
``train.resume`` continues it or ``train.overwrite`` replaces it (reusing it silently would mix
old checkpoints, metrics and ``final/`` into the new run).

With N processes (``engine/distributed.py``) rank 0 prepares the directory before the others
look at it, and is the only one to write in it (config, metrics, checkpoints); every rank reads
the same checkpoint on resume, and a stop signal on any rank stops all of them at one step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from alignlab.core import notices
from alignlab.core.config import TrainSection, dump_config
from alignlab.core.errors import AlignlabError, ConfigError
from alignlab.core.io import atomic_write_text
from alignlab.engine import distributed, sharding
from alignlab.engine.checkpoint import (
    CheckpointError,
    earlier_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from alignlab.engine.metrics import MemoryLogger, MetricsLogger
from alignlab.engine.progress import Progress

# What a run writes into its directory; other files (caches such as the reference log-probs)
# survive an overwrite.
RUN_ARTEFACTS = ("checkpoints", "final", "DONE", "metrics.jsonl", "tensorboard", "eval", "wandb",
                 "wandb_run_id")
EARLIER_RUN = ("checkpoints", "final", "DONE", "metrics.jsonl")
CONFIG_FILE = "config.yaml"


class Interrupted(AlignlabError):
    """SIGINT/SIGTERM stopped training after a checkpoint was written."""


def prepare_output_dir(cfg: TrainSection) -> Path:
    """The run directory, created, writable and free of an earlier run (see the module doc).
    With N processes rank 0 decides (and may clear an earlier run) and the others take its
    answer: a check of their own could see the files rank 0 starts writing at once."""
    if not distributed.active():
        return _prepare_output_dir(cfg)
    error = None
    if distributed.is_main():
        try:
            _prepare_output_dir(cfg)
        except ConfigError as exc:
            error = str(exc)
    error = distributed.gather(error)[0]
    if error is not None:
        raise ConfigError(error)
    return Path(cfg.output_dir)


def _prepare_output_dir(cfg: TrainSection) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"field 'train.output_dir': {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"field 'train.output_dir': cannot create {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"field 'train.output_dir': {out} is not writable")
    earlier = [name for name in EARLIER_RUN if (out / name).exists()]
    if earlier and not cfg.resume:
        if not cfg.overwrite:
            raise ConfigError(
                f"field 'train.output_dir': {out} holds an earlier run ({', '.join(earlier)}); "
                "set train.resume=true to continue it or train.overwrite=true to replace it")
        for name in RUN_ARTEFACTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return out


def prepare_run(cfg: Any) -> Path:
    """Join the process group when a launcher started several processes (``distributed``), then
    ``prepare_output_dir(cfg.train)`` and the whole config written to
    ``<output_dir>/config.yaml`` (the console shows one line, not the dump). A resumed run
    rewrites it with the config it resumed with."""
    if distributed.setup(cfg.train.device):
        check_processes(cfg, distributed.world_size())
        sharding.check(cfg)
    out = prepare_output_dir(cfg.train)
    if "wandb" in cfg.train.report_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError("field 'train.report_to': 'wandb' needs the wandb package "
                          "(pip install wandb)")
    if distributed.is_main():
        atomic_write_text(out / CONFIG_FILE, dump_config(cfg))
    return out


def check_processes(cfg: Any, processes: int) -> None:
    """A ConfigError, before anything is loaded, when ``processes`` cannot share the batches:
    offline ``train.batch_size`` examples, online ``rollout.prompts_per_step`` prompts (a
    prompt's group of completions stays on one process)."""
    rollout = getattr(cfg, "rollout", None)
    if rollout is not None and hasattr(rollout, "prompts_per_step"):
        distributed.check_split(rollout.prompts_per_step, processes, "prompts per step",
                                "rollout.prompts_per_step")
    else:
        distributed.check_split(cfg.train.batch_size, processes, "examples per micro-batch",
                                "train.batch_size")


class TrainingRun:
    """``resume`` → ``open`` → ``step_done`` once per step → ``close``."""

    def __init__(self, cfg: TrainSection, model: torch.nn.Module, description: str) -> None:
        self.cfg, self.model, self.description = cfg, model, description
        self.output_dir = prepare_output_dir(cfg)
        self.logger: MetricsLogger | None = None
        self.progress: Progress | None = None
        self._signal: int | None = None
        self._handlers: dict[int, Any] = {}

    def resume(self) -> tuple[int, dict[str, Any] | None]:
        """``(step, trainer state)`` of the latest complete checkpoint when ``train.resume`` is
        set (its weights loaded into the model and the RNG states restored), else ``(0, None)``.
        Metrics logged after that checkpoint are dropped, so no step is logged twice."""
        ckpt = latest_checkpoint(self.output_dir) if self.cfg.resume else None
        if ckpt is None:
            return 0, None
        for candidate in [ckpt, *earlier_checkpoints(ckpt)]:
            try:
                state = load_checkpoint(candidate, self.model)
                break
            except CheckpointError as exc:
                warnings.warn(f"{exc}; trying the previous checkpoint", stacklevel=2)
        else:
            raise CheckpointError(f"no complete checkpoint in {ckpt.parent} could be loaded")
        ckpt = candidate
        step = int(state["step"])
        if distributed.is_main():
            _drop_metrics_after(self.output_dir / "metrics.jsonl", step)
            print(f"resumed from step {step} ({ckpt})")
        return step, state

    def open(self, start_step: int) -> TrainingRun:
        notices.reset()  # each run shows each warning's cause once
        main = distributed.is_main()
        self.logger = MetricsLogger(self.output_dir, tensorboard=self.cfg.tensorboard,
                                    purge_step=start_step + 1 if start_step else None,
                                    wandb="wandb" in self.cfg.report_to,
                                    config=self._config()) if main else MemoryLogger()
        self.progress = Progress(self.cfg.max_steps, start_step, self.cfg.progress and main,
                                 self.description)
        self._catch_signals()
        return self

    def _config(self) -> dict[str, Any]:
        """The whole run config ``prepare_run`` wrote, else just the train section."""
        path = self.output_dir / CONFIG_FILE
        if path.exists():
            return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return {"train": self.cfg.model_dump(mode="json")}

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.logger.history if self.logger is not None else []

    def step_done(self, step: int, metrics: dict[str, Any], info: str,
                  state: Callable[[], dict[str, Any]]) -> None:
        """Log ``metrics`` every ``log_every`` steps and at the end; checkpoint every
        ``save_every`` steps, at the end, and when a stop signal arrived (then stop)."""
        last = step == self.cfg.max_steps
        if step % self.cfg.log_every == 0 or last:
            self.logger.log(step, metrics)
        self.progress.update(info)
        stop = distributed.any_rank(self._signal is not None)
        if stop or (self.cfg.save_every and (step % self.cfg.save_every == 0 or last)):
            trainer_state = state()  # on every rank: it may gather each rank's part
            weights = sharding.full_state_dict(self.model)  # on every rank: FSDP2 gathers
            if distributed.is_main():
                save_checkpoint(self.output_dir, step, self.model, trainer_state,
                                keep=self.cfg.save_total_limit, weights=weights)
        if stop:
            name = signal.Signals(self._signal or signal.SIGTERM).name
            raise Interrupted(f"{name} at step {step}: checkpoint written to "
                              f"{self.output_dir / 'checkpoints'}; continue with "
                              "--set train.resume=true")

    def close(self) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers = {}
        if self.progress is not None:
            self.progress.close()
        if self.logger is not None:
            self.logger.close()
        for cause, n in (notices.repeated() if distributed.is_main() else {}).items():
            print(f"warning {cause!r} occurred {n} more time(s) after the first (see "
                  f"{self.output_dir / 'metrics.jsonl'})")

    def _catch_signals(self) -> None:
        """SIGINT/SIGTERM mark the run to stop after the current step (main thread only)."""
        if signal.getsignal(signal.SIGINT) is None or not _main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._signal = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop now)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._handlers[sig] = signal.signal(sig, handler)

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _drop_metrics_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
