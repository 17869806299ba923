"""Atomic checkpoints: weights in safetensors, the rest of the training state beside them.

A checkpoint directory ``step-000100/`` holds ``model.safetensors`` (every trainable module's
state), ``trainer_state.pt`` (optimizer, scheduler, RNG states, data position, step; loaded
with ``weights_only=True`` so nothing is unpickled) and ``meta.json``. It is written under a
temporary name and renamed into place; ``latest`` names the newest complete one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from alignlab.core.io import atomic_write_text, replace_dir


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


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module,
                    trainer_state: dict[str, Any], keep: int = 2) -> Path:
    ckpt_root = Path(output_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({**trainer_state, "rng": rng_state(), "step": step}, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step}) + "\n")
    replace_dir(tmp, ckpt_root / name)
    atomic_write_text(ckpt_root / "latest", name + "\n")
    for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt_root / name


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpt_root = Path(output_dir) / "checkpoints"
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    path = Path(path)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint {path} has weights the model lacks: {unexpected[:5]}")
    state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    set_rng_state(state.pop("rng"))
    return state
