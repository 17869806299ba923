"""User reward functions named in a config: ``module:function`` or ``path/to/file.py:function``.

A module is imported as Python would, and also from the working directory when it lives
there (as ``python -m`` would find it, so ``PYTHONPATH=.`` is not needed). A file path (it
ends in ``.py`` or contains a path separator) is loaded from that file, relative to the
working directory. Every failure is one ``ConfigError`` naming the config field and what to fix.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def is_file_target(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def split_target(target: str) -> tuple[str, str]:
    """``'a/b.py:fn'`` → ``('a/b.py', 'fn')``; the function is after the last colon."""
    module, _, attr = target.rpartition(":")
    return module, attr


def canonical_target(target: str) -> str:
    """The target with a file path made absolute (a sandboxed worker runs elsewhere)."""
    module, attr = split_target(target)
    if is_file_target(module):
        return f"{Path(module).expanduser().resolve()}:{attr}"
    return target


def load_user_function(target: str, field: str = "rl.reward") -> Callable[..., Any]:
    """The callable ``target`` names (see the module docstring)."""
    from alignlab.core.errors import ConfigError

    module_name, attr = split_target(target)
    if not module_name or not attr:
        raise ConfigError(f"{field}: {target!r} must read module:function or "
                          "path/to/file.py:function")
    if is_file_target(module_name):
        module = _load_file(module_name, target, field)
    else:
        module = _import(module_name, target, field)
    if not hasattr(module, attr):
        defined = sorted(n for n, v in vars(module).items()
                         if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"{field}: {module_name} has no function {attr!r}; it defines: "
                          f"{', '.join(defined) or 'no public functions'}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(f"{field}: {target!r} is not callable")
    return fn


def _import(name: str, target: str, field: str) -> Any:
    from alignlab.core.errors import ConfigError

    cwd = os.getcwd()
    top = name.split(".")[0]
    in_cwd = (Path(cwd) / f"{top}.py").is_file() or (Path(cwd) / top).is_dir()
    if in_cwd and cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            raise ConfigError(f"{field}: cannot load user reward {target!r}: no module named "
                              f"{exc.name!r} on the Python path or in the working directory "
                              f"{cwd}; give a file instead (path/to/file.py:function) or set "
                              "PYTHONPATH") from None
        raise ConfigError(f"{field}: cannot load user reward {target!r}: {name} imports "
                          f"{exc.name!r}, which is not installed") from None
    except Exception as exc:
        raise ConfigError(f"{field}: cannot load user reward {target!r}: importing {name} "
                          f"raised {type(exc).__name__}: {exc}") from None


def _load_file(name: str, target: str, field: str) -> Any:
    from alignlab.core.errors import ConfigError

    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{field}: reward file {name} not found (looked at {path})")
    # One module per file: a stable name so re-resolving the same file reuses it.
    module_name = f"alignlab_user_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{field}: reward file {path} cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise ConfigError(f"{field}: cannot load user reward {target!r}: running {path} raised "
                          f"{type(exc).__name__}: {exc}{where}") from None
    return module


__all__ = ["canonical_target", "load_user_function", "split_target"]
