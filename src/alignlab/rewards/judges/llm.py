"""LLM-as-a-judge: a local causal LM compares two responses (Zheng et al. 2023, "Judging
LLM-as-a-Judge with MT-Bench and Chatbot Arena").

The judge reads a versioned prompt template (``JudgeTemplate``: the question, response A,
response B, "Which response is better, A or B?") and answers in one of two modes:

- ``logprob`` (default): the answer is the model's probability of the two label continuations,
  ``P(A) = exp ℓ_A / (exp ℓ_A + exp ℓ_B)`` with ``ℓ_X = log p(label_X | prompt)`` summed over
  the label's tokens (one next-token read when both labels are single tokens). That gives
  ``P(a ≻ b)`` directly, with nothing to parse.
- ``generate``: the model answers greedily in text and ``template.pattern`` (a regex whose group
  1 is a label) reads the answer: 1 for A, 0 for B. An answer it cannot read raises
  ``JudgeParseError`` naming the example and the output, or (``on_parse_error="skip"``) gives
  no verdict (None, counted in ``parse_skips``).

LLM judges prefer the response shown first (Zheng et al. 2023, "position bias"). With
``debias`` the pair is judged in both orders and ``P(a ≻ b) = (P_A(a, b) + 1 − P_A(b, a)) / 2``
(``P_A(x, y)``: the probability of label A with x shown first), so swapping a and b gives
exactly ``1 − P(a ≻ b)``, and a judge that only looks at positions says 0.5.

Verdicts are cached (``cache.py``) under the judge model's content fingerprint
(``models/fingerprint.py``), the template's version and text, the mode and the pair: a second
call on the same pairs does not run the model (``cache.hits`` / ``cache.misses``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from alignlab.core.errors import AlignlabError, ConfigError
from alignlab.data.collate import pad_collate
from alignlab.models.fingerprint import directory_fingerprint, module_fingerprint
from alignlab.models.logprobs import next_token_logits
from alignlab.rewards.judges.base import Verdict, swap_debiased_verdict
from alignlab.rewards.judges.cache import VerdictCache, verdict_key

_FIELD = re.compile(r"\{(prompt|a|b)\}")


class JudgeParseError(AlignlabError):
    """The judge's generated answer names neither label."""


@dataclass(frozen=True)
class JudgeTemplate:
    """The judge's prompt: ``text`` with ``{prompt}``, ``{a}`` and ``{b}`` (the response shown
    first and second); ``labels`` are the continuations naming them; ``pattern`` reads a
    generated answer (group 1 must equal a label, stripped). Change ``version`` with the text."""

    text: str
    version: str
    labels: tuple[str, str] = (" A", " B")
    pattern: str = r"\b([AB])\b"

    def __post_init__(self) -> None:
        missing = [f for f in ("{prompt}", "{a}", "{b}") if f not in self.text]
        if missing:
            raise ConfigError(f"judge template {self.version!r}: the text lacks {', '.join(missing)}")
        if self.labels[0].strip() == self.labels[1].strip() or not all(s.strip() for s in self.labels):
            raise ConfigError(f"judge template {self.version!r}: labels must be two different "
                              f"non-empty strings, got {self.labels!r}")
        try:
            groups = re.compile(self.pattern).groups
        except re.error as exc:
            raise ConfigError(f"judge template {self.version!r}: pattern {self.pattern!r} is not "
                              f"a regular expression: {exc}") from None
        if groups < 1:
            raise ConfigError(f"judge template {self.version!r}: pattern {self.pattern!r} needs a "
                              "group (the label)")

    def render(self, prompt: str, first: str, second: str) -> str:
        # One pass, not str.format or chained replaces: a response may itself hold "{b}".
        fields = {"prompt": prompt, "a": first, "b": second}
        return _FIELD.sub(lambda m: fields[m.group(1)], self.text)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), ensure_ascii=False).encode()).hexdigest()[:16]


DEFAULT_TEMPLATE = JudgeTemplate(
    text=("Compare two responses to the same prompt.\n\n"
          "Prompt: {prompt}\n\n"
          "Response A: {a}\n\n"
          "Response B: {b}\n\n"
          "Which response is better, A or B? Answer:"),
    version="pairwise-ab-v1")

Mode = Literal["logprob", "generate"]


class LLMJudge:
    """``P(a ≻ b)`` from a causal LM (see the module docstring); a ``PairwiseJudge``."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, template: JudgeTemplate = DEFAULT_TEMPLATE,
                 mode: Mode = "logprob", debias: bool = True, batch_size: int = 8,
                 max_new_tokens: int = 8, on_parse_error: Literal["raise", "skip"] = "raise",
                 chat: bool = False, fingerprint: str | None = None,
                 cache_path: str | Path | None = None) -> None:
        if mode not in ("logprob", "generate"):
            raise ConfigError(f"LLM judge mode: got {mode!r}; allowed values: logprob, generate")
        if on_parse_error not in ("raise", "skip"):
            raise ConfigError(f"LLM judge on_parse_error: got {on_parse_error!r}; allowed "
                              "values: raise, skip")
        if batch_size < 1 or max_new_tokens < 1:
            raise ConfigError("LLM judge batch_size and max_new_tokens must be positive")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.mode, self.debias, self.batch_size = mode, debias, batch_size
        self.max_new_tokens, self.on_parse_error, self.chat = max_new_tokens, on_parse_error, chat
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.label_ids = [list(tokenizer(s, add_special_tokens=False)["input_ids"])
                          for s in template.labels]
        if not all(self.label_ids) or self.label_ids[0] == self.label_ids[1]:
            raise ConfigError(f"judge template {template.version!r}: labels {template.labels!r} "
                              f"tokenize to {self.label_ids}; they must be different and non-empty")
        self.fingerprint = fingerprint or module_fingerprint(model)
        self.cache = VerdictCache(cache_path)
        self.parse_skips = 0
        self.identity = {"judge": "llm", "model": self.fingerprint,
                         "template": template.version, "template_sha": template.digest(),
                         "mode": mode, "debias": debias, "chat": chat,
                         "max_new_tokens": max_new_tokens if mode == "generate" else None}

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "auto", device: str | torch.device = "cpu",
                        **kwargs: Any) -> LLMJudge:
        """A judge from a local model directory, fingerprinted by its files' bytes."""
        from alignlab.models.loading import freeze, load_model, load_tokenizer

        model = freeze(load_model(path, dtype=dtype, device=device))
        return cls(model, load_tokenizer(path), fingerprint=directory_fingerprint(path), **kwargs)

    # ---- the PairwiseJudge interface --------------------------------------------------------

    def cached(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[bool]:
        """Whether each pair's verdict is already cached (judging it would not run the model)."""
        return [self._key(p, x, y) in self.cache for p, x, y in zip(prompts, a, b)]

    def judge(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
              ) -> list[Verdict | None]:
        if not len(prompts) == len(a) == len(b):
            raise ConfigError(f"LLM judge: {len(prompts)} prompts, {len(a)} a, {len(b)} b")
        keys = [self._key(p, x, y) for p, x, y in zip(prompts, a, b)]
        return self.cache.lookup(keys, lambda idx: self._judge([prompts[i] for i in idx],
                                                               [a[i] for i in idx],
                                                               [b[i] for i in idx], idx))

    def counters(self) -> dict[str, int]:
        return {**self.cache.counters(), "parse_skips": self.parse_skips}

    def load_counters(self, state: dict[str, int]) -> None:
        self.cache.load_counters(state)
        self.parse_skips = int(state.get("parse_skips", 0))

    # ---- one model pass over the pairs not cached ------------------------------------------

    def _key(self, prompt: str, a: str, b: str) -> str:
        return verdict_key(self.identity, prompt, a, b)

    def _judge(self, prompts: list[str], a: list[str], b: list[str], index: list[int]
               ) -> list[Verdict | None]:
        texts = [self._render(p, x, y) for p, x, y in zip(prompts, a, b)]
        if self.debias:
            texts += [self._render(p, y, x) for p, x, y in zip(prompts, a, b)]
        was_training = self.model.training
        self.model.eval()  # no dropout while judging; a model that was training goes back to it
        try:
            first = (self._p_first(texts) if self.mode == "logprob"
                     else self._read_answers(texts, index))
        finally:
            self.model.train(was_training)
        n, out = len(prompts), []
        for i in range(n):
            p_ab = first[i]
            p_ba = first[n + i] if self.debias else None
            if p_ab is None or (self.debias and p_ba is None):
                self.parse_skips += 1
                out.append(None)
                continue
            out.append(swap_debiased_verdict(p_ab, p_ba))
        return out

    def _render(self, prompt: str, first: str, second: str) -> str:
        text = self.template.render(prompt, first, second)
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      tokenize=False, add_generation_prompt=True)
        return text

    def _encode(self, text: str) -> list[int]:
        # A chat-rendered text already holds the model's special tokens.
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    @torch.inference_mode()
    def _p_first(self, texts: list[str]) -> list[float]:
        """P(label A | text) against label B, per text."""
        la, lb = self.label_ids
        single = len(la) == 1 and len(lb) == 1
        # Single-token labels: one sequence per text, both labels read at its last position.
        # Otherwise each label is a continuation scored token by token.
        seqs = [(t, lab) for t in texts for lab in ([la] if single else [la, lb])]
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            examples = []
            for text, lab in chunk:
                ids = self._encode(text)
                examples.append({"input_ids": ids + lab, "loss_mask": [0] * len(ids) + [1] * len(lab)})
            batch = {k: v.to(device) for k, v in pad_collate(examples, self.pad).items()}
            logits, targets, scored = next_token_logits(self.model, batch)
            logp = torch.log_softmax(logits, dim=-1)
            if single:
                diff = logp[:, la[0]] - logp[:, lb[0]]
            else:
                row = scored.nonzero()[:, 0]
                per_seq = torch.zeros(len(chunk), device=logp.device)
                per_seq.index_add_(0, row, logp.gather(1, targets[:, None])[:, 0])
                diff = per_seq
            scores.extend(diff.tolist())
        if single:
            return [_sigmoid(d) for d in scores]
        return [_sigmoid(scores[2 * i] - scores[2 * i + 1]) for i in range(len(texts))]

    @torch.inference_mode()
    def _read_answers(self, texts: list[str], index: list[int]) -> list[float | None]:
        """1.0 when the generated answer names label A, 0.0 for B, None when skipped."""
        outputs = self._generate(texts)
        wanted = [s.strip() for s in self.template.labels]
        pattern = re.compile(self.template.pattern)
        out: list[float | None] = []
        for j, output in enumerate(outputs):
            match = pattern.search(output)
            label = match.group(1).strip() if match else None
            if label in wanted:
                out.append(1.0 if label == wanted[0] else 0.0)
                continue
            example = index[j % len(index)]
            order = "a shown first" if j < len(index) else "b shown first (position swap)"
            if self.on_parse_error == "raise":
                raise JudgeParseError(
                    f"LLM judge: cannot parse the answer to example {example} ({order}): output "
                    f"{output!r} has no label {wanted} matching the pattern {self.template.pattern} "
                    "(set on_parse_error: skip to drop such pairs)")
            out.append(None)
        return out

    def _generate(self, texts: list[str]) -> list[str]:
        device = next(self.model.parameters()).device
        outputs: list[str] = []
        for start in range(0, len(texts), self.batch_size):
            ids = [self._encode(t) for t in texts[start:start + self.batch_size]]
            width = max(map(len, ids))
            # Left padding: every row's answer starts at the same column.
            input_ids = torch.tensor([[self.pad] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            gen = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=self.pad)
            outputs.extend(self.tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True))
        return outputs


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


__all__ = ["DEFAULT_TEMPLATE", "JudgeParseError", "JudgeTemplate", "LLMJudge"]
