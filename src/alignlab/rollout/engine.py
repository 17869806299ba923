"""alignlab's built-in rollout engine: batched sampling with a KV cache from any causal LM.

``rollout(model, prompt_ids, params)`` left-pads the prompts, prefills them once into a KV cache
(each distinct prompt once, so the ``n`` samples of a prompt share its prefill), and decodes one
token per step for the rows still running; rows that finish are dropped from the batch and the
cache (``compact=True``; measured faster than masking them, see
``benchmarks/rollout_vs_generate.py``). The cache (``rollout/kv_cache.py``) writes each step in
place and, on CPU at sizes where it pays, keeps each prompt's keys once for all its samples.

Log-probs. ``RolloutBatch.logprobs[i, t] = log softmax(z_t / T)[y_t]``: the sampling policy's
distribution after temperature and *before* top-k/top-p/min-p truncation. RL importance ratios
``pi_theta(y|x) / pi_old(y|x)`` and KL terms compare the policy at the training temperature with
itself, and the trainer recomputes ``pi_theta`` with ``token_logprobs(model, batch, temperature=T)``,
which never truncates; truncated log-probs would bias every ratio of a token that survives the
filter. Greedy decoding (T = 0) reports the log-probs of the untempered (T = 1) distribution.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from alignlab.core.errors import ConfigError
from alignlab.core.notices import warn_once
from alignlab.core.runtime import autocast
from alignlab.rollout.filters import apply_temperature, truncate
from alignlab.rollout.kv_cache import rollout_cache

LENGTH_WARNING = ("most completions were cut at max_new_tokens; rewards of truncated completions "
                  "are usually wrong (zero-reward trap): raise max_new_tokens or add a stop")


@dataclass
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy; ``top_k=0``, ``top_p=1``, ``min_p=0`` are off.

    Generation of a completion ends at an eos id (reason ``eos``), one of ``stop_token_ids`` or
    a ``stop`` string in the decoded text (``stop``), or after ``max_new_tokens`` (``length``).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 32
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int = 0
    first_prompt: int = 0
    """The index of the first prompt in a larger batch this call samples part of: each chunk
    of ``batch_size`` rows is seeded by ``seed`` and its first prompt's index (``chunk_seed``)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """The forward passes' precision: ``bf16`` runs them under bf16 autocast, as the trainer does
    under ``train.precision: bf16`` (the sampler's log-probs then differ from the trainer's by
    kernels, not by precision, as with vLLM's ``dtype: train``; on a CPU with native bf16 it
    is also the faster sampler)."""

    def __post_init__(self) -> None:
        self.stop_token_ids, self.stop = tuple(self.stop_token_ids), tuple(self.stop)
        checks = {"temperature": self.temperature >= 0, "top_p": 0 < self.top_p <= 1,
                  "top_k": self.top_k >= 0, "min_p": 0 <= self.min_p <= 1,
                  "max_new_tokens": self.max_new_tokens >= 1, "n": self.n >= 1,
                  "stop": all(isinstance(s, str) and s for s in self.stop),
                  "precision": self.precision in ("fp32", "bf16")}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"SamplingParams.{name}: invalid value {getattr(self, name)!r} "
                                  "(temperature >= 0, 0 < top_p <= 1, top_k >= 0, 0 <= min_p <= 1, "
                                  "max_new_tokens >= 1, n >= 1, stop = non-empty strings, "
                                  "precision = fp32 or bf16)")


@dataclass
class RolloutBatch:
    """``N = len(prompts) * n`` samples, ordered p0, p0, ..., p1, p1, ...

    ``completion_ids[i]`` includes the token that ended the sample (eos or a stop id): it was
    sampled, so it is trained on. ``texts[i]`` drops special tokens and is cut before a matched
    stop string. ``logprobs`` / ``completion_mask`` are ``[N, L]`` (``L`` = longest completion),
    zero-padded on the right.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: Tensor
    completion_mask: Tensor
    finish_reasons: list[str]
    texts: list[str]
    prompt_index: list[int]
    pad_token_id: int
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def padded(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Prompt + completion per row, right-padded, for ``alignlab.models.logprobs.token_logprobs``.

        ``loss_mask`` is 1 on completion tokens; ``old_logprobs`` holds ``logprobs`` at those same
        positions, so ``token_logprobs(model, batch, temperature=T) - batch["old_logprobs"]`` is
        the per-token log-ratio.
        """
        rows = [p + c for p, c in zip(self.prompt_ids, self.completion_ids)]
        width = max(len(r) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(n, width, dtype=torch.long)
        loss_mask = torch.zeros(n, width, dtype=torch.long)
        old = torch.zeros(n, width, dtype=torch.float32)
        for i, (p, c) in enumerate(zip(self.prompt_ids, self.completion_ids)):
            input_ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[i, :len(p) + len(c)] = 1
            loss_mask[i, len(p):len(p) + len(c)] = 1
            old[i, len(p):len(p) + len(c)] = self.logprobs[i, :len(c)]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
                 "position_ids": position_ids, "old_logprobs": old}
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


class LogitsProcessor(Protocol):
    """Rewrites next-token logits ``[b, V]`` of the running rows (``-inf`` removes a token)."""

    def start(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
              n: int) -> None:
        """The left-padded prompts of a chunk were prefilled; each will be sampled ``n`` times."""

    def __call__(self, logits: Tensor) -> Tensor:
        """The processed logits of the rows now running, in the engine's row order."""

    def advance(self, tokens: Tensor, keep: Tensor | None, attention_mask: Tensor,
                position_ids: Tensor) -> None:
        """Rows ``keep`` (all if None) go on; ``tokens`` (already compacted to them) were fed to
        the model with these ``attention_mask``/``position_ids``."""


def sample_next(logits: Tensor, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``(tokens [B], log pi_T(token) [B])`` from last-position logits ``[B, V]``."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        z = logits
    else:
        z = apply_temperature(logits, params.temperature)
        kept = truncate(z, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)
        tokens = _draw(torch.softmax(kept, dim=-1), generator)
    logp = z.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return tokens, logp


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row by inverting the CDF with one uniform draw (exact, and on CPU several
    times cheaper than ``torch.multinomial``); ``right=True`` never picks a zero-probability token."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


class _StopStrings:
    """Checks the decoded tail of each running row; a string of c characters spans at most c tokens."""

    def __init__(self, stops: tuple[str, ...], tokenizer: Any) -> None:
        if stops and tokenizer is None:
            raise ConfigError("SamplingParams.stop: stop strings need a tokenizer to decode with")
        self.stops, self.tokenizer = stops, tokenizer
        self.window = max((len(s) for s in stops), default=0) + 1

    def hits(self, tokens: Tensor, lengths: Tensor, rows: list[int]) -> list[int]:
        out = []
        for r in rows:
            end = int(lengths[r])
            tail = self.tokenizer.decode(tokens[r, max(0, end - self.window):end].tolist())
            if any(s in tail for s in self.stops):
                out.append(r)
        return out


# no_grad, not inference_mode: under inference_mode autocast does not cache its bf16 copies of
# the weights, so a bf16 rollout cast every weight again at every decoded token (36% of its time
# on the benchmark's 44M Llama; benchmarks/README.md)
@torch.no_grad()
def _rollout_chunk(model: nn.Module, prompts: list[list[int]], params: SamplingParams, *,
                   eos_ids: set[int], pad: int, generator: torch.Generator | None,
                   stop_strings: _StopStrings, compact: bool,
                   processor: LogitsProcessor | None = None) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """Decode one chunk; returns ``(tokens [B,T], logprobs [B,T], lengths [B], reasons)``."""
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad, device)
    cache, attention = rollout_cache(model.config, ids.shape[1], params.max_new_tokens, device,
                                     rows=ids.shape[0], n=params.n)
    if attention is None:
        return _decode(model, ids, mask, cache, params, eos_ids=eos_ids, pad=pad,
                       generator=generator, stop_strings=stop_strings, compact=compact,
                       processor=processor)
    attention.set_prompt_mask(mask)
    with attention:
        return _decode(model, ids, mask, cache, params, eos_ids=eos_ids, pad=pad,
                       generator=generator, stop_strings=stop_strings, compact=compact,
                       processor=processor)


def _decode(model: nn.Module, ids: Tensor, mask: Tensor, cache: Any, params: SamplingParams, *,
            eos_ids: set[int], pad: int, generator: torch.Generator | None,
            stop_strings: _StopStrings, compact: bool,
            processor: LogitsProcessor | None) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    device = ids.device
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                use_cache=True, **extra)
    logits = out.logits[:, -1]
    n, big = params.n, ids.shape[0] * params.n
    if processor is not None:
        processor.start(ids, mask, position_ids, n)
    if n > 1:  # n samples of a prompt share its prefill
        cache.batch_repeat_interleave(n)
        mask, logits = mask.repeat_interleave(n, 0), logits.repeat_interleave(n, 0)
    next_pos = position_ids[:, -1:].repeat_interleave(n, 0) + 1
    T = params.max_new_tokens
    tokens = torch.full((big, T), pad, dtype=torch.long, device=device)
    logps = torch.zeros(big, T, dtype=torch.float32, device=device)
    lengths = torch.zeros(big, dtype=torch.long, device=device)
    reasons = ["length"] * big
    stop_ids = torch.tensor(sorted(eos_ids | set(params.stop_token_ids)), dtype=torch.long,
                            device=device)
    active = torch.arange(big, device=device)   # full-batch row of each compute row
    running = torch.ones(big, dtype=torch.bool, device=device)  # used when compact=False
    for step in range(T):
        if processor is not None:
            logits = processor(logits)
        tok, lp = sample_next(logits, params, generator)
        rows = active if compact else active[running]
        sel_tok, sel_lp = (tok, lp) if compact else (tok[running], lp[running])
        tokens[rows, step], logps[rows, step] = sel_tok, sel_lp
        lengths[rows] += 1
        done = torch.isin(tok, stop_ids)
        if not compact:
            done &= running
        if stop_strings.stops:
            cand = (~done if compact else ~done & running).nonzero().flatten()
            for j in stop_strings.hits(tokens, lengths, [int(active[c]) for c in cand]):
                reasons[j] = "stop"
                done[(active == j).nonzero().flatten()] = True
        for j, t in zip(active[done].tolist(), tok[done].tolist()):
            reasons[j] = "eos" if t in eos_ids else "stop"
        if not compact:
            running &= ~done
        keep = ~done if compact else running
        if step == T - 1 or not bool(keep.any()):
            break
        idx = None
        if compact and bool(done.any()):
            idx = keep.nonzero().flatten()
            cache.batch_select_indices(idx)
            active, mask, next_pos, tok = active[idx], mask[idx], next_pos[idx], tok[idx]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                    cache=cache, use_cache=True)
        if processor is not None:
            processor.advance(tok, idx, mask, next_pos)
        logits, next_pos = out.logits[:, -1], next_pos + 1
    return tokens, logps, lengths, reasons


def rollout(model: nn.Module, prompt_ids: list[list[int]], params: SamplingParams, *,
            eos_token_id: int | list[int] | None, pad_token_id: int, tokenizer: Any = None,
            batch_size: int = 256, compact: bool = True,
            logits_processor: LogitsProcessor | None = None,
            warn_length: bool = True) -> RolloutBatch:
    """Sample ``params.n`` completions of each prompt (token ids, no special tokens added).

    ``batch_size`` caps the rows (prompts x n) decoded together. Each such chunk samples with
    its own generator, seeded by ``params.seed`` and the index of its first prompt
    (``params.first_prompt`` is the index of ``prompt_ids[0]`` in a larger batch), so a chunk's samples
    do not depend on the chunks before it: N processes that each sample a chunk-aligned share
    of a batch draw what one process draws for the whole batch. The model's train/eval mode is
    restored afterwards. Sets ``stats["frac_hit_length_limit"]`` and, with ``warn_length``,
    warns (once per run) when more than half of the completions hit ``max_new_tokens``.
    """
    if not prompt_ids:
        raise ConfigError("rollout: no prompts given")
    empty = [i for i, p in enumerate(prompt_ids) if not p]
    if empty:
        raise ConfigError(f"rollout: prompts {empty[:5]} are empty; every prompt needs >= 1 token")
    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    stop_strings = _StopStrings(params.stop, tokenizer)
    device = next(model.parameters()).device
    per_chunk = max(1, batch_size // params.n)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    comp_ids: list[list[int]] = []
    logp_rows: list[Tensor] = []
    reasons: list[str] = []
    try:
        for lo in range(0, len(prompt_ids), per_chunk):
            generator = torch.Generator(device=device).manual_seed(
                chunk_seed(params.seed, params.first_prompt + lo))
            with autocast(device, params.precision):
                tokens, logps, lengths, why = _rollout_chunk(
                    model, prompt_ids[lo:lo + per_chunk], params, eos_ids=eos_ids,
                    pad=pad_token_id, generator=generator, stop_strings=stop_strings,
                    compact=compact, processor=logits_processor)
            tokens, logps, lengths = tokens.cpu(), logps.cpu(), lengths.tolist()
            comp_ids += [tokens[i, :k].tolist() for i, k in enumerate(lengths)]
            logp_rows += [logps[i, :k] for i, k in enumerate(lengths)]
            reasons += why
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    width = max(1, max(len(c) for c in comp_ids))
    logprobs = torch.zeros(len(comp_ids), width)
    completion_mask = torch.zeros(len(comp_ids), width, dtype=torch.long)
    for i, lp in enumerate(logp_rows):
        logprobs[i, :len(lp)], completion_mask[i, :len(lp)] = lp, 1
    texts = [_text(ids, why, params.stop, tokenizer) for ids, why in zip(comp_ids, reasons)]
    frac_length = length_limit_fraction(reasons, warn=warn_length)
    stats = {"frac_hit_length_limit": frac_length, "seconds": seconds,
             "completions_per_s": len(comp_ids) / max(seconds, 1e-9),
             "mean_completion_tokens": sum(map(len, comp_ids)) / len(comp_ids)}
    return RolloutBatch(
        prompt_ids=[p for p in prompt_ids for _ in range(params.n)], completion_ids=comp_ids,
        logprobs=logprobs, completion_mask=completion_mask, finish_reasons=reasons, texts=texts,
        prompt_index=[i for i in range(len(prompt_ids)) for _ in range(params.n)],
        pad_token_id=pad_token_id, stats=stats)


def chunk_seed(seed: int, first_prompt: int) -> int:
    """The generator seed of the chunk starting at prompt ``first_prompt``: ``seed`` itself for
    the first chunk, a hash of both for the others (no collision with other seeds' chunks)."""
    if first_prompt == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{first_prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def length_limit_fraction(finish_reasons: list[str], *, warn: bool = True) -> float:
    """The fraction of completions cut at ``max_new_tokens``; above one half it warns (once per
    run: ``core/notices.py``)."""
    frac = finish_reasons.count("length") / max(len(finish_reasons), 1)
    if warn and frac > 0.5:
        warn_once("length-limit", f"{frac:.0%} of completions: {LENGTH_WARNING}", stacklevel=3)
    return frac


def _text(ids: list[int], reason: str, stops: tuple[str, ...], tokenizer: Any) -> str:
    if tokenizer is None:
        return ""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if reason == "stop" and stops:
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
        text = text[:cut]
    return text


__all__ = ["SamplingParams", "RolloutBatch", "LogitsProcessor", "rollout", "sample_next",
           "LENGTH_WARNING", "length_limit_fraction"]
