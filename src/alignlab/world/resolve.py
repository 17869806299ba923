"""The one place that resolves ``world:`` names: ``world:base`` (the base model) and
``world:<task>`` (a task: its prompts, demonstrations and gold reward)."""

from __future__ import annotations

from typing import Any

from alignlab.core.config import WorldSection
from alignlab.core.errors import ConfigError

WORLD_PREFIX = "world:"


def is_world(name: str) -> bool:
    return name.startswith(WORLD_PREFIX)


def get_world(world: WorldSection):
    """The world the config names, built on first use."""
    from alignlab.world.build import ensure_world

    return ensure_world(world.preset, world.seed, world.cache_dir)


def world_task(source: str, world: WorldSection, field: str) -> Any:
    """The task of ``world:<task>`` given in config ``field`` (a ``ConfigError`` naming it)."""
    try:
        return get_world(world).task(source[len(WORLD_PREFIX):])
    except ConfigError as exc:
        raise ConfigError(f"{field}: {exc}") from None


def resolve_model_path(name_or_path: str, world: WorldSection) -> str:
    """``world:base`` → the built-in world's base model directory (built on first use)."""
    if not is_world(name_or_path):
        return name_or_path
    what = name_or_path[len(WORLD_PREFIX):]
    if what != "base":
        raise ConfigError(f"model.name_or_path: unknown world model {what!r}; allowed values: world:base")
    return str(get_world(world).base_dir)
