"""Reference log-probs ``log π_ref(y | x)``, computed once before training and cached.

Every ref-based preference loss compares the policy with a *frozen* reference. The values are
computed once per example with the reference model (never the policy being trained) and stored
in each example as ``ref_logps`` (one float per completion slot, see
:func:`alignlab.data.preference_batches.group_completions`). They are cached in
``<output_dir>/reference_logps.safetensors`` under a key hashing the token ids and the
reference model's content (its weight, config and tokenizer files' bytes, see
``models/fingerprint.py``), so a resumed run (or a second run on the same data) reuses them and a change
of data or reference recomputes them. Token-level losses get the per-token values instead
(``per_token=True``: one list per example, the slots' tokens concatenated) and MRPO's extra
references their own cache files (``cache_file``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignlab.core.runtime import autocast, to_device
from alignlab.data.preference_batches import collate_groups, group_completions
from alignlab.models.fingerprint import directory_fingerprint, module_fingerprint
from alignlab.models.logprobs import (
    completion_logprobs,
    completion_token_logprobs,
    preferred_layout,
)

CACHE_FILE = "reference_logps.safetensors"


def reference_key(examples: list[dict[str, Any]], reference: str, precision: str) -> str:
    """sha256 over the reference model's fingerprint, the precision and every example's token ids."""
    h = hashlib.sha256(json.dumps([reference, precision]).encode())
    for e in examples:
        h.update(json.dumps([e["prompt_ids"], group_completions(e)]).encode())
    return h.hexdigest()


@torch.inference_mode()
def compute_reference_logps(model: nn.Module, examples: list[dict[str, Any]], pad_token_id: int, *,
                            batch_size: int, device: torch.device, precision: str = "fp32",
                            layout: str = "shared", per_token: bool = False) -> list[list[float]]:
    """``log π_ref`` of every completion of every example (one list per example, slot order;
    ``per_token``: every completion token's, the slots concatenated).

    Batches are formed over the examples sorted by length (prompt, then longest completion):
    the values do not depend on batching, and near-equal lengths waste almost nothing on
    padding (random batches of the benchmark's prompts pad ~25%)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]["prompt_ids"]),
                                                        max(map(len, group_completions(examples[i])))))
    out: list[list[float]] = [[] for _ in examples]
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            chunk = [examples[i] for i in index]
            batch = to_device(collate_groups(chunk, pad_token_id, layout=layout), device)
            with autocast(device, precision):
                lp = (completion_token_logprobs if per_token else completion_logprobs)(model, batch)
            per: list[list[Any]] = [[0.0] * len(group_completions(e)) for e in chunk]
            for value, n, b, k in zip(lp.float().cpu().tolist(), batch["completion_lengths"].tolist(),
                                      batch["owner"].tolist(), batch["slot"].tolist()):
                per[b][k] = value[:n] if per_token else value
            for i, values in zip(index, per):
                out[i] = [v for slot in values for v in slot] if per_token else values
    finally:
        model.train(was_training)
    return out


def save_reference_cache(path: Path, key: str, values: list[list[float]]) -> None:
    from safetensors.torch import save_file

    flat = torch.tensor([v for per in values for v in per], dtype=torch.float64)
    counts = torch.tensor([len(per) for per in values], dtype=torch.long)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"values": flat, "counts": counts}, str(tmp), metadata={"key": key})
    tmp.replace(path)


def load_reference_cache(path: Path, key: str) -> list[list[float]] | None:
    """The cached values if ``path`` exists and was written for ``key``, else None."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        flat, counts = f.get_tensor("values").tolist(), f.get_tensor("counts").tolist()
    out, i = [], 0
    for n in counts:
        out.append(flat[i:i + n])
        i += n
    return out


def attach_reference_logps(examples: list[dict[str, Any]], load_model: Any, reference: str,
                           pad_token_id: int, *, output_dir: str | Path, batch_size: int,
                           device: torch.device, precision: str, layout: str | None = None,
                           field: str = "ref_logps", cache_file: str = CACHE_FILE,
                           per_token: bool = False, quantization: str = "none") -> bool:
    """Set ``example[field]`` for every example, from the cache or by computing them with
    the model ``load_model()`` returns (called on a cache miss, and to fingerprint a reference
    that is not a local directory). Returns True on a hit.

    ``layout`` None: prefix sharing when it is exact for the reference model, else padded
    (always padded or packed when ``per_token``). ``quantization`` names what ``load_model``
    does to the weights (``models/quantize.py``), part of the cache key."""
    path = Path(output_dir) / cache_file
    # Keyed on the reference's content, not its path: new weights saved at the same path recompute.
    fingerprint, model = directory_fingerprint(reference), None
    if fingerprint is None:
        model = load_model()
        fingerprint = module_fingerprint(model)
    # the cached values are those of the model as run: per-token, or int8 (``load_model``'s)
    tags = ("#per_token" if per_token else "") + ("" if quantization == "none" else f"#{quantization}")
    key = reference_key(examples, fingerprint + tags, precision)
    values = load_reference_cache(path, key)
    hit = values is not None
    if not hit:
        model = (model if model is not None else load_model()).to(device)
        if layout is None or (per_token and layout == "shared"):
            layout = "flat" if per_token else preferred_layout(model)[0]
        values = compute_reference_logps(model, examples, pad_token_id, batch_size=batch_size,
                                         device=device, precision=precision, layout=layout,
                                         per_token=per_token)
        del model
        save_reference_cache(path, key, values)
    for e, v in zip(examples, values):
        e[field] = v
    return hit


__all__ = ["CACHE_FILE", "attach_reference_logps", "compute_reference_logps",
           "load_reference_cache", "reference_key", "save_reference_cache"]
