"""What the side-by-side benchmarks build: a world tokenizer, a random-init Llama of a named
size (built locally, no hub download), prompts of a token-length range, and the matmul peak
that MFU is measured against."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

# name -> (hidden, layers); heads of 64 dims, SwiGLU width 8/3·hidden rounded to 64. Parameter
# counts with the world tokenizer's ~960-token vocabulary, untied embeddings.
MODEL_SIZES = {
    "3m": (256, 4),     # 3.5M
    "13m": (512, 4),    # 13.6M
    "44m": (768, 6),    # 44.0M: the GRPO and DPO benchmarks' default
    "100m": (1024, 8),  # 102M
}
MAX_POSITIONS = 2048


def build_model(folder: Path, size: str, *, vocab: int = 1024, seed: int = 0) -> Path:
    """Save a world tokenizer and a random-init ``LlamaForCausalLM`` of ``size`` (a key of
    :data:`MODEL_SIZES`, or ``"<hidden>x<layers>"``) under ``folder``; the folder's path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignlab.world import language as lang
    from alignlab.world.tokenizer import train_tokenizer

    hidden, layers = MODEL_SIZES[size] if size in MODEL_SIZES else map(int, size.split("x"))
    tok = train_tokenizer(lang.generate_corpus(0, 3000), vocab_size=vocab)
    tok.model_max_length = 2 * MAX_POSITIONS
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def review_contexts(tok, n: int, lo: int, hi: int, seed: int = 0) -> list[tuple[str, Any]]:
    """``n`` world-language prompts of ``lo``..``hi`` tokens (lengths uniform in that range, up
    to one review), each with the ``ReviewPrefix`` it ends with: a few reviews of context and a
    review to continue, as chat data has a long context and a short question."""
    from alignlab.world import language as lang

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prefix = lang.random_review_prefix(rng)
        target = rng.randint(lo, hi)
        reviews: list[str] = []
        lengths: list[int] = []
        total = len(tok(prefix.text, add_special_tokens=False)["input_ids"])
        while total < target:
            r = lang.generate_review(rng)
            reviews.append(r)
            lengths.append(len(tok(" " + r, add_special_tokens=False)["input_ids"]))
            total += lengths[-1]
        while total > hi and reviews:  # one review too many
            reviews.pop(0)
            total -= lengths.pop(0)
        out.append((" ".join([*reviews, prefix.text]), prefix))
    return out


def review_prompts(tok, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """The texts of :func:`review_contexts`."""
    return [text for text, _ in review_contexts(tok, n, lo, hi, seed)]


def token_lengths(tok, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def matmul_peak(bf16: bool, n: int = 2048, repeats: int = 10, trials: int = 5,
                seconds: float = 3.0) -> float:
    """FLOP/s of a square matmul on this machine now, in the training precision: the best of
    at least ``trials`` timings of ``repeats`` products, timed for at least ``seconds`` (one
    timing moved between 108 and 141 GFLOP/s from run to run on the 2-core AVX2 machine; one
    whole measurement of about a second on the shared EPYC once read 415 GFLOP/s where the
    measurements around it read 780–800, and printed an MFU of 0.885). See :func:`highest_peak`."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, done, start = 0.0, 0, time.perf_counter()
    while done < trials or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t))
        done += 1
    return best


def highest_peak(bf16: bool, results: dict[str, dict]) -> float:
    """The matmul peak an MFU is measured against: the highest of one measured now and those
    the workers in ``results`` measured right after their timed runs (``peak_flops``). A peak
    read in a slow moment of a shared machine would inflate the MFU; the highest of several,
    spread over the run, is the conservative one."""
    return max([matmul_peak(bf16), *(r["peak_flops"] for r in results.values() if "peak_flops" in r)])


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all but the input embedding table (a lookup)."""
    n = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return n - (0 if tied else embedding.numel())
