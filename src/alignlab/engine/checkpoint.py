"""Atomic checkpoints: weights in safetensors, the rest of the training state beside them.

A checkpoint directory ``step-000100/`` holds ``model.safetensors`` (every trainable module's
state), ``trainer_state.pt`` (optimizer, scheduler, RNG states, data position, step; loaded
with ``weights_only=True`` so nothing is unpickled) and ``meta.json``. It is written under a
temporary name and renamed into place; ``latest`` names the newest complete one. A model sharded
by FSDP2 (``sharding.py``) is written from its full state dict, the same file as an unsharded
run's, and loaded back into the shards of every rank.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from alignlab.core.errors import AlignlabError
from alignlab.core.io import atomic_write_text, replace_dir
from alignlab.engine import sharding


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(AlignlabError):
    """A checkpoint could not be written or read."""


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module,
                    trainer_state: dict[str, Any], keep: int = 2,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoints/step-N`` atomically, point ``latest`` at it, keep the newest ``keep``.
    ``weights``: the model's full state dict when it is sharded (``sharding.full_state_dict``).

    A failed write (a full disk) removes the partial copy and leaves the previous checkpoint
    and ``latest`` as they were."""
    ckpt_root = Path(output_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        if weights is None and _views_of_one_buffer(model):
            weights = _own_tensors(model)
        if weights is not None:
            save_file({k: v.contiguous() for k, v in weights.items()},
                      str(tmp / "model.safetensors"))
        else:
            save_model(model, str(tmp / "model.safetensors"))
        torch.save({**trainer_state, "rng": rng_state(), "step": step}, tmp / "trainer_state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step}) + "\n")
        replace_dir(tmp, ckpt_root / name)
        atomic_write_text(ckpt_root / "latest", name + "\n")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = (ckpt_root / "latest").read_text().strip() if (ckpt_root / "latest").exists() else None
        raise CheckpointError(f"could not write checkpoint {ckpt_root / name}: {exc.strerror or exc}; "
                              f"the previous checkpoint ({previous or 'none'}) is kept") from None
    older = sorted((p for p in ckpt_root.glob("step-*") if p.is_dir() and p.name != name),
                   key=_step_of)
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt_root / name


def _views_of_one_buffer(model: torch.nn.Module) -> bool:
    """Whether distinct parameters are views of one storage: DeepSpeed ZeRO flattens each
    parameter group into one buffer (``engine/zero.py``), which safetensors' ``save_model`` and
    ``load_model`` refuse as shared tensors they cannot tell apart from tied ones."""
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    return len(set(ptrs)) < len(ptrs)


def _own_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor copied out of its buffer; of tied names (one parameter
    under several) the first in sorted order, as ``save_model`` keeps."""
    seen: dict[int, str] = {}
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        seen.setdefault(id(tensor), name)
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in seen.values()}


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names; None when there is no pointer (a fresh run). A pointer
    to a missing checkpoint is an error, not a silent restart from step 0."""
    ckpt_root = Path(output_dir) / "checkpoints"
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return None
    path = ckpt_root / pointer.read_text().strip()
    if not (path / "trainer_state.pt").exists():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete; "
                              "remove the pointer to start over, or point it at a complete "
                              "checkpoint")
    return path


def earlier_checkpoints(path: Path) -> list[Path]:
    """Complete checkpoints older than ``path``, newest first (fallbacks for a damaged one)."""
    return sorted((p for p in path.parent.glob("step-*")
                   if p.is_dir() and _step_of(p) < _step_of(path)
                   and (p / "trainer_state.pt").exists()), key=_step_of, reverse=True)


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    path = Path(path)
    try:
        if sharding.is_sharded(model):
            unexpected = sharding.load_full_state_dict(model, load_file(path / "model.safetensors"))
        elif _views_of_one_buffer(model):  # copied into the views, in place
            loaded = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
            unexpected = loaded.unexpected_keys
        else:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from None
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has weights the model lacks: {unexpected[:5]}")
    set_rng_state(state.pop("rng"))
    return state
