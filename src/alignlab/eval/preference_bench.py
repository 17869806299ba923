"""Measuring a preference run: KL on samples, and a timing hook for side-by-side speed
benchmarks (``benchmarks/dpo_vs_trl.py``)."""

from __future__ import annotations

import gc
import tempfile
import time
from typing import Any

import torch

from alignlab.algorithms.preference.reference import compute_reference_logps
from alignlab.core.config import TrainSection
from alignlab.data.batches import EpochBatches
from alignlab.data.loading import rows_from_list
from alignlab.data.preference_batches import collate_groups
from alignlab.data.tokenize import tokenize_rows
from alignlab.engine.loop import train


@torch.no_grad()
def sample_kl(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any,
              prompts: list[str], *, max_new_tokens: int = 48, seed: int = 0,
              batch_size: int = 64) -> float:
    """``E_{y∼π}[log π(y|x) − log ref(y|x)]``: the sequence-level KL(π‖ref) estimated on samples."""
    from alignlab.rollout.sampling import sample

    s = sample(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed,
               batch_size=batch_size)
    eos = tokenizer.eos_token_id
    examples = [{"prompt_ids": tokenizer(p, add_special_tokens=False)["input_ids"],
                 "completion_ids": ids + ([eos] if why == "eos" else []), "label": True}
                for p, ids, why in zip(s.prompts, s.completion_ids, s.finish_reasons) if ids or why == "eos"]
    device = next(policy.parameters()).device
    pol = compute_reference_logps(policy, examples, tokenizer.pad_token_id, batch_size=batch_size,
                                  device=device, layout="flat")
    ref = compute_reference_logps(reference.to(device), examples, tokenizer.pad_token_id,
                                  batch_size=batch_size, device=device, layout="flat")
    return sum(p[0] - r[0] for p, r in zip(pol, ref)) / len(examples)


def benchmark_steps(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]], *,
                    steps: int, batch_size: int, loss: str = "dpo", beta: float | None = None,
                    reference: torch.nn.Module | None = None, precision: str = "auto",
                    device: str = "auto", lr: float = 1e-6, max_length: int | None = None,
                    prefix_sharing: bool | None = None, grad_accum: int = 1,
                    gradient_checkpointing: bool | str = False,
                    reference_quantization: str = "none") -> dict[str, Any]:
    """Train ``model`` for ``steps`` optimizer steps of ``loss`` on preference ``rows``
    (prompt/chosen/rejected dicts, the same rows a TRL DPOTrainer gets, or already tokenised
    prompt_ids/chosen_ids/rejected_ids dicts; then ``tokenizer`` only gives the pad id) and time it.

    The reference log-probs are precomputed first with ``reference`` (default: a frozen copy of
    ``model`` as it is now) and timed separately, like TRL's ``precompute_ref_log_probs``.
    ``tokens`` counts the tokens of the 2·pairs prompt+completion sequences the steps consumed
    (the unshared count, so it compares with a trainer that does not share prefixes).
    Returns ``tokens``, ``pairs``, ``seconds`` (the training steps, wall clock),
    ``reference_seconds``, ``tokens_per_s``, ``pairs_per_s``, ``layout`` and ``step_seconds``
    (each optimizer step's forward, backward and update, a list). ``gradient_checkpointing``
    recomputes each decoder layer in backward (``train.gradient_checkpointing``: True, or
    ``"selective"`` for the element-wise ops only); ``reference_quantization`` ``int8`` runs the
    reference's decoder matmuls in int8 (``preference.reference_quantization``)."""
    import copy

    from alignlab.algorithms.preference.trainer import (
        PreferenceObjective,
        PreferenceSection,
        choose_layout,
        plan_losses,
    )
    from alignlab.core.config import DataSection
    from alignlab.core.runtime import pick_device, resolve_precision
    from alignlab.models.loading import freeze
    from alignlab.models.quantize import quantize_frozen

    section = PreferenceSection(loss=loss, beta=beta, prefix_sharing=prefix_sharing)
    plan = plan_losses(section)
    if "prompt_ids" in rows[0]:  # already token ids
        examples, pad = [dict(r) for r in rows], tokenizer.pad_token_id
    else:
        tokenized = tokenize_rows(rows_from_list(rows, format="preference"), tokenizer,
                                  max_length=max_length)
        examples, pad = tokenized.examples, tokenized.pad_token_id
    layout = choose_layout(section, DataSection(), model)
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    t0 = time.perf_counter()
    if plan.needs_reference:
        ref = reference if reference is not None else freeze(copy.deepcopy(model))
        ref = quantize_frozen(ref, reference_quantization, device=dev, precision=prec,
                              field="reference_quantization")
        values = compute_reference_logps(ref.to(dev), examples, pad, batch_size=2 * batch_size,
                                         device=dev, precision=prec, layout=layout)
        for e, v in zip(examples, values):
            e["ref_logps"] = v
        del ref  # our frozen copy is not needed once its log-probs are cached
        gc.collect()
    reference_seconds = time.perf_counter() - t0
    batches = EpochBatches(examples, batch_size, lambda ex: collate_groups(ex, pad, layout=layout))
    seen: list[int] = []

    def count(ex: list[dict[str, Any]]) -> dict[str, Any]:
        seen.append(sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                        for e in ex))
        return collate_groups(ex, pad, layout=layout)

    batches.collate = count
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainSection(output_dir=out, max_steps=steps, batch_size=batch_size, lr=lr,
                           grad_accum=grad_accum, precision=prec, device=str(dev),
                           lr_scheduler="constant", log_every=max(steps, 1), progress=False,
                           tensorboard=False, gradient_checkpointing=gradient_checkpointing,
                           save_every=None)  # no checkpoint, as the TRL side (save_strategy="no")
        step_seconds: list[float] = []
        t1 = time.perf_counter()
        train(model, PreferenceObjective(plan), batches, cfg, description=f"bench {loss}",
              on_step=lambda _, m: step_seconds.append(m["step_time"]))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t1
    pairs = steps * grad_accum * batch_size
    tokens = float(sum(seen))
    return {"tokens": tokens, "pairs": float(pairs), "seconds": seconds,
            "reference_seconds": reference_seconds, "tokens_per_s": tokens / seconds,
            "pairs_per_s": pairs / seconds, "layout": layout, "step_seconds": step_seconds}


__all__ = ["benchmark_steps", "sample_kl"]
