"""The reference a preference run compares with: resolved, loaded (under LoRA the policy's own
base with its adapters disabled; int8 when ``preference.reference_quantization`` asks), and its
log-probs precomputed into the examples (cached, ``reference.py``) or the model returned for the
objective to run (``precompute_reference: false``)."""

from __future__ import annotations

from typing import Any

import torch

from alignlab.algorithms.preference.inputs import attach_references
from alignlab.core.errors import ConfigError
from alignlab.engine import distributed
from alignlab.models.adapters import adapters_disabled, has_adapters
from alignlab.models.fast_path import preferred_layout
from alignlab.models.loading import load_reference_model
from alignlab.models.quantize import check_quantization, quantize_frozen
from alignlab.world.resolve import resolve_model_path


def prepare_reference(cfg: Any, model: torch.nn.Module, per_token: bool,
                      examples: list[dict[str, Any]], pad: int, layout: str,
                      device: torch.device, precision: str
                      ) -> tuple[torch.nn.Module | None, bool | None]:
    """``(model, hit)``: precomputed, ``ref_logps`` (and the per-token / multi-reference columns)
    attached to ``examples``, no model, and whether they came from the cache; else the reference
    model the objective runs, and None."""
    refs = [resolve_model_path(r, cfg.world) for r in cfg.preference.reference_models
            or [cfg.preference.reference or cfg.model.name_or_path]]
    own = resolve_model_path(cfg.model.name_or_path, cfg.world)

    quantization = cfg.preference.reference_quantization
    check_quantization(quantization, device=device, precision=precision,
                       field="preference.reference_quantization")

    def load(path: str) -> torch.nn.Module:
        if path == own and has_adapters(model):  # LoRA: the base under the adapters, no copy
            if quantization != "none":
                raise ConfigError("field 'preference.reference_quantization': under LoRA the "
                                  "reference is the policy's own base weights; set it to none")
            return adapters_disabled(model)
        return quantize_frozen(
            load_reference_model(path, dtype=cfg.model.dtype,
                                 trust_remote_code=cfg.model.trust_remote_code,
                                 attn_implementation=cfg.model.attn_implementation),
            quantization, device=device, precision=precision,
            field="preference.reference_quantization")

    if cfg.preference.precompute_reference:
        # Rank 0 computes and caches them; the other processes then read its cache.
        with distributed.main_first():
            hit = attach_references(examples, refs, tokens=per_token, load=load,
                                    pad_token_id=pad, output_dir=cfg.train.output_dir,
                                    batch_size=2 * cfg.train.batch_size, device=device,
                                    precision=precision, quantization=quantization,
                                    layout=None if layout == "shared" else layout)
        print(f"reference log-probs: {'reused' if hit else 'computed'} ({', '.join(refs)})")
        return None, hit
    ref_model = load(refs[0]).to(device)
    ref_layout, _ = preferred_layout(ref_model, per_token=per_token)
    if layout == "shared" and ref_layout != "shared":
        raise ConfigError("field 'preference.prefix_sharing': the reference model does not "
                          "support it; set it to false or precompute_reference to true")
    return ref_model, None


__all__ = ["prepare_reference"]
