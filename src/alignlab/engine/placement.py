"""Where the online controller's roles run: ``train.placement``.

An online trainer asks its placement for its roles and runs the controller inside it::

    placement = open_placement(cfg.train, "grpo")
    rewards = placement.rewards(factory)        # a reward role, here or on a worker
    backend = placement.rollout_backend(policy_factory, tokenizer, batch_size=..., local=...)
    rollout = RolloutRole(..., backend=backend)  # samples here or on rollout workers
    with placement:                             # workers ready; stopped at the end
        run_online(...)

``local`` builds every role in this process (``factory()``; the rollout backend ``local``
builds, or the role's default). ``ray`` (``ray_placement.py``) builds them on Ray actors from
the same factories and hands back stand-ins with the same methods (a rollout backend, a reward
role, a judge), so the controller and the algorithm run unchanged: only plain data (prompts,
completions, scores, weights) crosses between processes. Factories must pickle (module-level
functions and ``functools.partial`` of them, configs, world tasks).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from alignlab.core.config import TrainSection
from alignlab.core.errors import ConfigError

RAY_MISSING = ("field 'train.placement': 'ray' needs Ray, which is not installed: "
               "pip install 'alignlab[ray]' (or pip install ray); or set it to 'local'")


class LocalPlacement:
    """Every role in the trainer's process."""

    name = "local"

    def rollout_backend(self, policy_factory: Callable[[], Any], tokenizer: Any, *,
                        batch_size: int, local: Callable[[], Any] | None = None) -> Any:
        """``local()`` (None: the rollout role's default, the built-in engine on the policy)."""
        return local() if local is not None else None

    def rewards(self, factory: Callable[[], Any]) -> Any:
        return factory()

    def judge(self, factory: Callable[[], Any], key: str = "judge") -> Any:
        return factory()

    def close(self) -> None:
        """Nothing runs elsewhere."""

    def __enter__(self) -> LocalPlacement:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def placement_of(train: TrainSection) -> str:
    """``train.placement`` (``local`` for sections without it: the offline trainers')."""
    return getattr(train, "placement", "local")


def refuse_ray(train: TrainSection, trainer: str, why: str) -> None:
    """ConfigError naming ``train.placement`` when ``trainer`` cannot run on Ray (``why``)."""
    if placement_of(train) == "ray":
        raise ConfigError(f"field 'train.placement': {trainer} cannot run on Ray: {why}; "
                          f"set it to 'local'")


def open_placement(train: TrainSection, trainer: str) -> Any:
    """``LocalPlacement`` or, for ``placement: ray``, a ``RayPlacement`` connected to Ray (a
    ConfigError naming the field when Ray is not installed)."""
    if placement_of(train) == "local":
        return LocalPlacement()
    processes = int(os.environ.get("WORLD_SIZE") or 1)
    if processes > 1:  # each process would start its own workers and train alone
        raise ConfigError(f"field 'train.placement': 'ray' runs one trainer process that drives "
                          f"the Ray workers, not {processes} (WORLD_SIZE); launch one process "
                          f"or set it to 'local'")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    from alignlab.engine.ray_placement import RayPlacement

    return RayPlacement(train.ray, device=train.device, trainer=trainer)


__all__ = ["LocalPlacement", "RAY_MISSING", "open_placement", "placement_of", "refuse_ray"]
