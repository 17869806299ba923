"""Batched sampling for evaluation (Hugging Face ``generate`` with a KV cache).

The online-RL issue adds alignlab's own rollout engine behind the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Samples:
    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    finish_reasons: list[str]


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, n: int = 1, max_new_tokens: int = 32,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 64,
           seed: int = 0) -> Samples:
    """Sample ``n`` completions per prompt; prompts are repeated in place (p0, p0, p1, p1, ...)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    expanded = [p for p in prompts for _ in range(n)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out_text, out_ids, reasons = [], [], []
    eos = tokenizer.eos_token_id
    try:
        for start in range(0, len(expanded), batch_size):
            chunk = expanded[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            if temperature > 0:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
            seqs = model.generate(**enc, **kwargs)
            new = seqs[:, enc["input_ids"].shape[1]:].tolist()
            for ids in new:
                if eos in ids:
                    ids = ids[:ids.index(eos)]
                    reasons.append("eos")
                else:
                    reasons.append("length")
                out_ids.append(ids)
                out_text.append(tokenizer.decode(ids, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return Samples(expanded, out_text, out_ids, reasons)
