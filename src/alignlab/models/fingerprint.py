"""Content fingerprints of a model: what a cache of its outputs must be keyed on.

A path names a place, not weights: a model re-saved at the same path (or a run's ``final/``
overwritten by the next run) must invalidate every cache computed from it. The fingerprint is a
sha256 over the *bytes* of the files that decide the model's outputs (weights, config,
tokenizer), or over the in-memory tensors when the model has no local directory. Sizes and
modification times are not enough: a copy keeps the size and ``cp -p`` or a restore keeps
the time. Hashing reads every byte once (about 1-2 GB/s), small next to the forward passes the
cache saves.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

# Files whose bytes decide what the model computes; everything else in a model directory
# (alignlab_config.yaml, README, training logs) is ignored so re-writing it keeps the cache.
_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken")
_CHUNK = 1 << 20


def _hash_file(h: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def _files(root: Path, recursive: bool) -> list[Path]:
    found = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in found if p.is_file() and p.name.endswith(_SUFFIXES))


def directory_fingerprint(path: str | os.PathLike, *, recursive: bool = False) -> str | None:
    """sha256 over the name and bytes of every weight, config and tokenizer file directly in
    ``path`` (``recursive``: in its sub-folders too, e.g. an ensemble's members), sorted by
    name; None when ``path`` is not a local directory."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    h = hashlib.sha256(b"alignlab.fingerprint.v1")
    for file in _files(root, recursive):
        name = file.relative_to(root).as_posix()
        h.update(f"\0{name}\0{file.stat().st_size}\0".encode())
        _hash_file(h, file)
    return h.hexdigest()


_memo: dict[tuple[str, bool], tuple[tuple, str | None]] = {}


def memoized_fingerprint(path: str | os.PathLike, *, recursive: bool = False) -> str | None:
    """``directory_fingerprint``, hashed again only when a file's stat changed: for callers
    that ask on every call (a reward model scored each iteration). The stat signature holds
    each file's inode, size, mtime and *ctime*; ctime cannot be set from user space and
    changes on every write, so a rewrite that keeps the size and mtime (``cp -p``) is still
    seen."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    sig = tuple((f.relative_to(root).as_posix(), st.st_ino, st.st_size, st.st_mtime_ns,
                 st.st_ctime_ns) for f in _files(root, recursive) for st in (f.stat(),))
    key = (str(root.resolve()), recursive)
    cached = _memo.get(key)
    if cached is None or cached[0] != sig:
        cached = (sig, directory_fingerprint(root, recursive=recursive))
        _memo[key] = cached
    return cached[1]


def module_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model`` (name, dtype, shape and bytes)."""
    h = hashlib.sha256(b"alignlab.module.v1")
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = ["directory_fingerprint", "memoized_fingerprint", "module_fingerprint"]
