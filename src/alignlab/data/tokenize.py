"""Rows → examples: token ids with a loss mask, or prompt/completion ids for pairwise methods.

An example is a dict of python lists (docs/ARCHITECTURE.md). By format:

- ``text``: ``input_ids`` (+eos), ``loss_mask`` 1 on every token but the first.
- ``prompt_completion``: ``input_ids`` = prompt + completion + eos; ``loss_mask`` 1 on the
  completion (``completion_only_loss=True``) or on every token but the first.
- ``messages``: the chat template's rendering; ``loss_mask`` 1 on assistant turns (found by
  rendering the conversation prefix by prefix, so any template works) or everywhere.
- ``preference``: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (+ ``margin``, ``tie``,
  ``group``).
- ``unpaired``: ``prompt_ids``, ``completion_ids``, ``label`` and/or ``reward``.
- ``ranked``: ``prompt_ids``, ``completion_ids`` (one list per completion), ``scores``.
- ``prompt_only``: ``prompt_ids``.
- ``language_feedback``: ``prompt_ids``, ``completion_ids``, ``feedback_ids``
  (+ ``refinement_ids``).

Completion ids end with eos. Conversational completions are rendered by the chat template,
which marks the end of a turn itself; eos is appended only when the rendering has none.
Prompt and completion are tokenised separately and concatenated, so the boundary is exact.

Truncation to ``max_length`` (prompt + longest completion) follows one stated policy:

- ``keep_end_of_prompt``: drop prompt tokens from the left (a leading bos is kept); the
  completion is cut on the right only if it does not fit next to a one-token prompt.
- ``truncate_completion``: cut the completion's right end; the prompt is left-truncated only
  if it alone leaves no room for one completion token.
- ``drop``: drop the row.

Single sequences (``text``, ``messages``) are cut on the right; when that leaves no trained
token (every assistant turn lay past ``max_length``), ``keep_end_of_prompt`` keeps the end of
the conversation instead (bos kept) and the other policies drop the row, counted. Prompt-only
rows are cut on the left. :class:`TokenizedRows` counts kept, truncated and dropped rows so the caller logs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alignlab.core.errors import ConfigError
from alignlab.data.loading import RowSet

TRUNCATION_POLICIES = ("keep_end_of_prompt", "truncate_completion", "drop")


@dataclass
class TokenizedRows:
    """Examples of one format and what truncation did (``kept`` includes ``truncated``)."""

    format: str
    examples: list[dict[str, Any]]
    kept: int
    truncated: int
    dropped: int
    pad_token_id: int
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        """One line for the training log."""
        line = (f"{self.format}: {self.kept} rows kept ({self.truncated} truncated), "
                f"{self.dropped} dropped")
        return "; ".join([line, *self.notes])


def resolve_pad_token_id(tokenizer: Any) -> tuple[int, str | None]:
    """The tokenizer's pad id, or its eos id with a note when it has no pad token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id, None
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token; set "
                          "tokenizer.pad_token")
    return tokenizer.eos_token_id, (f"tokenizer has no pad token; padding with eos_token_id "
                                    f"{tokenizer.eos_token_id} (padding is masked out)")


def tokenize_rows(rows: RowSet, tokenizer: Any, *, max_length: int | None = None,
                  truncation: str = "keep_end_of_prompt", completion_only_loss: bool = True,
                  assistant_only_loss: bool = True,
                  keep_columns: Sequence[str] = ()) -> TokenizedRows:
    """Tokenise every row of ``rows`` (see the module docstring for what each format gives).

    ``keep_columns`` copies those row columns into the examples unchanged (e.g. a verifier's
    reference answer for online RL).
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ConfigError(f"unknown truncation {truncation!r}; allowed values: "
                          f"{', '.join(TRUNCATION_POLICIES)}")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos token; set tokenizer.eos_token")
    pad_id, note = resolve_pad_token_id(tokenizer)
    enc = _Encoder(tokenizer)
    fit = _Fitter(max_length, truncation, tokenizer.bos_token_id)
    build = _BUILDERS[rows.format]
    examples = []
    for i, row in enumerate(rows.rows):
        try:
            example = build(row, enc, fit, completion_only_loss=completion_only_loss,
                            assistant_only_loss=assistant_only_loss)
        except _RowProblem as e:
            raise rows.error(i, str(e), e.field) from None
        if example is None:
            continue
        for col in keep_columns:
            if col not in row:
                raise rows.error(i, "is missing (asked for by keep_columns)", col)
            example[col] = row[col]
        examples.append(example)
    notes = [note] if note else []
    if fit.kept_end:
        notes.append(f"{fit.kept_end} rows kept their last {max_length} tokens: the first "
                     f"{max_length} held no assistant token")
    if fit.no_target:
        notes.append(f"{fit.no_target} of the dropped rows had no assistant token within "
                     f"max_length {max_length}")
    return TokenizedRows(rows.format, examples, kept=len(examples), truncated=fit.truncated,
                         dropped=fit.dropped, pad_token_id=pad_id, notes=notes)


class _RowProblem(Exception):
    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class _Encoder:
    """Text and chat-template encoding with exact, separately tokenised pieces."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.prefix = self._special_prefix()

    def _special_prefix(self) -> list[int]:
        """Ids the tokenizer puts before text (e.g. bos); any it appends (eos) are not wanted."""
        plain = self.tok("a", add_special_tokens=False)["input_ids"]
        full = self.tok("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return list(full[:start])
        return []

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompt(self, text: str) -> list[int]:
        return self.prefix + self.ids(text)

    def completion(self, text: str) -> list[int]:
        return self.ids(text) + [self.eos]

    def render(self, messages: list[dict], generation_prompt: bool, field: str) -> list[int]:
        if getattr(self.tok, "chat_template", None) is None:
            raise ConfigError("conversational rows need a tokenizer with a chat_template")
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raises TemplateError and friends
            raise _RowProblem(f"chat template failed: {e}", field) from None
        return self.ids(text)

    def conversation(self, prompt: list[dict], completion: list[dict],
                     field: str) -> tuple[list[int], list[int]]:
        """Prompt ids (with the generation prompt) and the completion ids that follow them."""
        full = self.render(prompt + completion, False, field)
        for generation_prompt in (True, False):
            prompt_ids = self.render(prompt, generation_prompt, field)
            if full[:len(prompt_ids)] == prompt_ids:
                completion_ids = full[len(prompt_ids):]
                if self.eos not in completion_ids:
                    completion_ids.append(self.eos)
                return prompt_ids, completion_ids
        raise _RowProblem("the chat template renders the prompt differently on its own than "
                          "as the start of the conversation, so the completion cannot be "
                          "located", field)

    def messages(self, messages: list[dict], assistant_only: bool) -> tuple[list[int], list[int]]:
        """The rendered conversation and a mask that is 1 on assistant turns."""
        full = self.render(messages, False, "messages")
        mask = [0] * len(full) if assistant_only else [1] * len(full)
        if assistant_only:
            for i, msg in enumerate(messages):
                if msg["role"] != "assistant":
                    continue
                start, end = self._turn_span(messages, i, full)
                mask[start:end] = [1] * (end - start)
        return full, mask

    def _turn_span(self, messages: list[dict], i: int, full: list[int]) -> tuple[int, int]:
        upto = self.render(messages[:i + 1], False, "messages")
        if full[:len(upto)] != upto:
            raise _RowProblem(f"the chat template renders message {i} differently when later "
                              "messages follow, so assistant turns cannot be located", "messages")
        for generation_prompt in (True, False):
            before = self.render(messages[:i], generation_prompt, "messages")
            if upto[:len(before)] == before:
                return len(before), len(upto)
        raise _RowProblem(f"the chat template renders the messages before message {i} "
                          "differently on their own, so assistant turns cannot be located",
                          "messages")


class _Fitter:
    """Applies the truncation policy and counts what it did."""

    def __init__(self, max_length: int | None, policy: str, bos: int | None) -> None:
        self.max_length, self.policy, self.bos = max_length, policy, bos
        self.truncated = self.dropped = 0
        self.no_target = self.kept_end = 0  # sequences whose right cut left no trained token

    def left(self, ids: list[int], n: int) -> list[int]:
        if len(ids) <= n:
            return ids
        if self.bos is not None and ids and ids[0] == self.bos and n >= 2:
            return ids[:1] + ids[len(ids) - n + 1:]
        return ids[len(ids) - n:]

    def pair(self, prompt: list[int], completions: list[list[int]]
             ) -> tuple[list[int], list[list[int]]] | None:
        """Fit prompt + each completion into max_length; None means the row is dropped."""
        limit = self.max_length
        longest = max(len(c) for c in completions)
        if limit is None or len(prompt) + longest <= limit:
            return prompt, completions
        if self.policy == "drop":
            self.dropped += 1
            return None
        self.truncated += 1
        if self.policy == "keep_end_of_prompt":
            prompt = self.left(prompt, max(limit - longest, 1))
        elif len(prompt) >= limit:
            prompt = self.left(prompt, limit - 1)
        room = limit - len(prompt)
        return prompt, [c[:room] for c in completions]

    def sequence(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]] | None:
        """Cut on the right. A cut that leaves no trained token (every assistant turn lay past
        ``max_length``) keeps the end instead under ``keep_end_of_prompt`` (the leading bos
        kept), else drops the row and counts it in ``no_target``."""
        limit = self.max_length
        if limit is None or len(ids) <= limit:
            return ids, mask
        if self.policy == "drop":
            self.dropped += 1
            return None
        cut = ids[:limit], mask[:limit]
        if any(mask[1:]) and not any(cut[1][1:]):
            cut = self.left(ids, limit), self.left_mask(ids, mask, limit)
            if self.policy != "keep_end_of_prompt" or not any(cut[1][1:]):
                self.dropped += 1
                self.no_target += 1
                return None
            self.kept_end += 1
        self.truncated += 1
        return cut

    def left_mask(self, ids: list[int], mask: list[int], n: int) -> list[int]:
        """The mask of the tokens :meth:`left` keeps."""
        if self.bos is not None and ids and ids[0] == self.bos and n >= 2:
            return mask[:1] + mask[len(mask) - n + 1:]
        return mask[len(mask) - n:]

    def prompt_only(self, ids: list[int]) -> list[int] | None:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        if self.policy == "drop":
            self.dropped += 1
            return None
        self.truncated += 1
        return self.left(ids, self.max_length)


def _sequence_example(ids: list[int], mask: list[int]) -> dict[str, list[int]]:
    mask = list(mask)
    if mask:
        mask[0] = 0  # the first token has nothing to condition on
    return {"input_ids": list(ids), "loss_mask": mask}


def _prompt_and(enc: _Encoder, prompt: Any, completions: list, field: str | Sequence[str]
                ) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and the ids of each completion, standard or conversational."""
    fields = [field] * len(completions) if isinstance(field, str) else field
    if isinstance(prompt, list):
        outs = [enc.conversation(prompt, _as_turns(c), f) for c, f in zip(completions, fields)]
        return outs[0][0], [c for _, c in outs]
    return enc.prompt(prompt), [enc.completion(c) for c in completions]


def _as_turns(value: Any) -> list[dict]:
    return value if isinstance(value, list) else [{"role": "assistant", "content": value}]


def _build_text(row, enc, fit, **_):
    ids = enc.prompt(row["text"]) + [enc.eos]
    fitted = fit.sequence(ids, [1] * len(ids))
    return fitted and _sequence_example(*fitted)


def _build_prompt_completion(row, enc, fit, *, completion_only_loss, **_):
    fitted = fit.pair(*_prompt_and(enc, row["prompt"], [row["completion"]], "completion"))
    if fitted is None:
        return None
    prompt, (completion,) = fitted
    mask = [0 if completion_only_loss else 1] * len(prompt) + [1] * len(completion)
    return _sequence_example(prompt + completion, mask)


def _build_messages(row, enc, fit, *, assistant_only_loss, **_):
    if assistant_only_loss and not any(m["role"] == "assistant" for m in row["messages"]):
        raise _RowProblem("has no assistant message, so nothing to train on (the loss is on "
                          "assistant turns)", "messages")
    fitted = fit.sequence(*enc.messages(row["messages"], assistant_only_loss))
    return fitted and _sequence_example(*fitted)


def _build_preference(row, enc, fit, **_):
    fitted = fit.pair(*_prompt_and(enc, row["prompt"], [row["chosen"], row["rejected"]],
                                         ["chosen", "rejected"]))
    if fitted is None:
        return None
    prompt, (chosen, rejected) = fitted
    example = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
    example.update({k: row[k] for k in ("margin", "tie", "group") if k in row})
    return example


def _build_unpaired(row, enc, fit, **_):
    fitted = fit.pair(*_prompt_and(enc, row["prompt"], [row["completion"]], "completion"))
    if fitted is None:
        return None
    prompt, (completion,) = fitted
    example = {"prompt_ids": prompt, "completion_ids": completion}
    example.update({k: row[k] for k in ("label", "reward") if k in row})
    return example


def _build_ranked(row, enc, fit, **_):
    fitted = fit.pair(*_prompt_and(enc, row["prompt"], row["completions"], "completions"))
    if fitted is None:
        return None
    prompt, completions = fitted
    return {"prompt_ids": prompt, "completion_ids": completions, "scores": list(row["scores"])}


def _build_prompt_only(row, enc, fit, **_):
    prompt = row["prompt"]
    ids = enc.render(prompt, True, "prompt") if isinstance(prompt, list) else enc.prompt(prompt)
    ids = fit.prompt_only(ids)
    return None if ids is None else {"prompt_ids": ids}


def _build_language_feedback(row, enc, fit, **_):
    fields = ["completion", "refinement"] if "refinement" in row else ["completion"]
    fitted = fit.pair(*_prompt_and(enc, row["prompt"], [row[f] for f in fields], fields))
    if fitted is None:
        return None
    prompt, completions = fitted
    example = {"prompt_ids": prompt, "completion_ids": completions[0],
               "feedback_ids": enc.ids(row["feedback"])}
    if len(completions) > 1:
        example["refinement_ids"] = completions[1]
    return example


_BUILDERS = {
    "text": _build_text, "prompt_completion": _build_prompt_completion,
    "messages": _build_messages, "preference": _build_preference,
    "unpaired": _build_unpaired, "ranked": _build_ranked, "prompt_only": _build_prompt_only,
    "language_feedback": _build_language_feedback,
}
