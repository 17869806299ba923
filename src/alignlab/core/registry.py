"""Named registries: losses, algorithms, rewards, tasks, advantage estimators.

A registry maps an unambiguous name to a callable or class. Adding a method is one
function plus one ``@REGISTRY.register("name")`` line; ``alignlab list <registry>``
prints the names. A registry may name ``builtins``: modules that register their entries on
import, loaded on the first lookup (so the registry's module imports none of them, and a
built-in module may import the registry without a cycle).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from alignlab.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → object table with helpful errors for unknown names."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._builtins = builtins
        self._loaded = not builtins

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtins:
                importlib.import_module(module)

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            for key in (name, *aliases):
                if key in self._items and self._items[key] is not obj:
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
                self._items[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        self._load_builtins()
        try:
            return self._items[name]
        except KeyError:
            allowed = ", ".join(self.names())
            raise ConfigError(f"unknown {self.kind} {name!r}; allowed values: {allowed}") from None

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._items)

    def summary(self, name: str) -> str:
        """The first sentence of the registered object's docstring (of its first paragraph,
        unwrapped), for ``alignlab list -v``."""
        doc = inspect.getdoc(self.get(name)) or ""
        return first_sentence(" ".join(doc.split("\n\n")[0].split()))

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._items)


def first_sentence(text: str) -> str:
    """``text`` up to the first full stop followed by a capital letter (so "e.g. x" and
    "1e-3. " in formulas stay whole), or all of it; a paragraph that introduces a formula
    ("…, with:") ends with a full stop instead."""
    for i, ch in enumerate(text[:-2]):
        if ch == "." and text[i + 1] == " " and text[i + 2].isupper():
            return text[:i + 1]
    return text[:-1] + "." if text.endswith(":") else text
