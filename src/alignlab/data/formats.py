"""Row formats: the columns each kind of feedback needs, detection, and per-row validation.

The formats follow TRL's dataset conventions, so a TRL dataset loads unchanged:

=====================  =========================================================  ===========
format                 columns (``?`` = optional)                                 used by
=====================  =========================================================  ===========
``text``               ``text``                                                   pretraining
``prompt_completion``  ``prompt``, ``completion``                                 SFT
``messages``           ``messages`` (list of ``{role, content}``)                 SFT (chat)
``preference``         ``prompt``, ``chosen``, ``rejected``, ``margin?``,         DPO family, RM
                       ``tie?`` (bool), ``group?`` (str or int)
``unpaired``           ``prompt``, ``completion``, ``label`` (bool) and/or        KTO, BCO, DRO
                       ``reward`` (number)
``ranked``             ``prompt``, ``completions``, ``scores``                    listwise RM
``prompt_only``        ``prompt``                                                 online RL
``language_feedback``  ``prompt``, ``completion``, ``feedback``, ``refinement?``  ILF, CUT
=====================  =========================================================  ===========

``prompt``/``completion``/``chosen``/``rejected`` (and the items of ``completions``) are either
all strings (*standard*) or all message lists (*conversational*) within a row. A preference row
may leave out ``prompt`` (TRL's *implicit prompt*): the prompt is then the shared prefix of
``chosen`` and ``rejected`` (see :func:`split_implicit_prompt`).

``tie: true`` marks a pair the annotator could not separate (DPO with ties; a row without it is
no tie), ``group`` names the annotator group a pair came from (group-robust DPO), ``reward`` is
the scalar feedback on a single completion (DRO). The losses that need them say so when a row
lacks one.

Auto-detection looks at the columns of the first row and takes the first match in
:data:`DETECTION_ORDER`; extra columns are kept and ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from alignlab.core.errors import ConfigError, DataError
from alignlab.core.registry import Registry

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RowFormat:
    """A row format: required and optional fields with their kinds (see ``_CHECKS``)."""

    name: str
    required: dict[str, str]
    optional: dict[str, str]
    doc: str
    one_of: tuple[str, ...] = ()
    """Optional fields of which a row must have at least one."""

    @property
    def __doc__(self) -> str:  # shown by ``alignlab list formats -v``
        fields = f"fields: {', '.join(self.required)}"
        if self.optional:
            fields += f"; optional: {', '.join(self.optional)}"
        return f"{self.doc[:-1]} ({fields})."


FORMATS: Registry[RowFormat] = Registry("data format")


def _add(name: str, required: dict[str, str], optional: dict[str, str] | None, doc: str,
         one_of: tuple[str, ...] = ()) -> None:
    FORMATS.register(name)(RowFormat(name, required, optional or {}, doc, one_of))


_add("text", {"text": "str"}, None, "Plain text for language modelling; loss on every token.")
_add("prompt_completion", {"prompt": "turns", "completion": "turns"}, None,
     "A prompt and its completion for supervised fine-tuning.")
_add("messages", {"messages": "messages"}, None,
     "A conversation; loss on assistant turns.")
_add("preference", {"prompt": "turns", "chosen": "turns", "rejected": "turns"},
     {"margin": "float", "tie": "bool", "group": "key"},
     "A prompt with a preferred and a dispreferred completion.")
_add("unpaired", {"prompt": "turns", "completion": "turns"}, {"label": "bool", "reward": "float"},
     "A prompt and one completion labelled desirable (True) or undesirable (False), and/or "
     "given a scalar reward.", one_of=("label", "reward"))
_add("ranked", {"prompt": "turns", "completions": "turns_list", "scores": "float_list"}, None,
     "A prompt with two or more completions and a score for each (higher is better).")
_add("prompt_only", {"prompt": "turns"}, None, "A prompt for online generation.")
_add("language_feedback",
     {"prompt": "turns", "completion": "turns", "feedback": "str"}, {"refinement": "turns"},
     "A completion with written feedback and, optionally, a refined completion.")

# First match wins: the more specific column sets come before the ones they contain.
DETECTION_ORDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("messages", ("messages",)),
    ("preference", ("chosen", "rejected")),
    ("ranked", ("completions", "scores")),
    ("language_feedback", ("prompt", "completion", "feedback")),
    ("unpaired", ("prompt", "completion", "label")),
    ("unpaired", ("prompt", "completion", "reward")),
    ("prompt_completion", ("prompt", "completion")),
    ("text", ("text",)),
    ("prompt_only", ("prompt",)),
)


def detect_format(columns: Mapping[str, Any] | list[str], *, source: str | None = None,
                  line: int | None = None) -> str:
    """Name the format whose columns appear in ``columns`` (first match of DETECTION_ORDER)."""
    present = set(columns)
    for name, needed in DETECTION_ORDER:
        if present.issuperset(needed):
            return name
    known = "; ".join(f"{n}: {_needs(FORMATS.get(n))}" for n in FORMATS.names())
    raise DataError(f"cannot tell the data format from the columns {sorted(present)}; "
                    f"expected one of: {known}", source=source, line=line)


SFT_FORMATS = ("text", "prompt_completion", "messages")

# Which trainers read each format, for "wrong file" messages.
FORMAT_TRAINERS = {
    "text": "sft", "prompt_completion": "sft, reward (mse)", "messages": "sft",
    "preference": "dpo and the other preference losses, reward",
    "unpaired": "kto, bco (unpaired preference losses)",
    "ranked": "reward (plackett_luce), lipo_lambda",
    "prompt_only": "online RL (grpo, ppo, ...)", "language_feedback": "language-feedback methods",
}


def check_trainer_format(fmt: str, allowed: tuple[str, ...], *, trainer: str, source: str) -> None:
    """ConfigError unless rows of ``fmt`` are what ``trainer`` trains on: names the file's
    format, the formats the trainer needs and which trainers read the file's format."""
    if fmt in allowed:
        return
    each = [f"'{f}' ({_needs(FORMATS.get(f))})" for f in allowed]
    needs = " or ".join([", ".join(each[:-1]), each[-1]] if len(each) > 1 else each)
    raise ConfigError(f"data.source {source}: has '{fmt}' rows ({_needs(FORMATS.get(fmt))}), but "
                      f"{trainer} trains on {needs} rows; '{fmt}' rows are for "
                      f"{FORMAT_TRAINERS.get(fmt, 'other trainers')}")


def check_format_columns(fmt: str, row: Mapping[str, Any], *, source: str | None = None,
                         line: int | None = None) -> None:
    """Raise if ``row`` lacks a column that the explicitly chosen format ``fmt`` requires."""
    spec = FORMATS.get(fmt)
    required = [f for f in spec.required if not (fmt == "preference" and f == "prompt")]
    missing = [f for f in required if f not in row]
    if spec.one_of and not any(f in row for f in spec.one_of):
        missing.append(spec.one_of[0])
    if missing:
        raise DataError(f"rows do not match format '{fmt}': missing field(s) "
                        f"{', '.join(repr(m) for m in missing)} (columns: {sorted(row)})",
                        source=source, line=line, field=missing[0])


def _needs(spec: RowFormat) -> str:
    """The columns a row of ``spec`` needs, in words."""
    needs = ", ".join(spec.required)
    if spec.one_of:
        needs += " and " + " and/or ".join(spec.one_of)
    return needs


# ---- field checks: each returns the (possibly normalised) value or raises ----------------------

def _fail(problem: str) -> None:
    raise _FieldProblem(problem)


class _FieldProblem(Exception):
    """A field's value is wrong; validate_row adds file, line and field name."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_str(value: Any) -> str:
    if not isinstance(value, str):
        _fail(f"must be a string, got {_type_name(value)} {value!r:.40}")
    if not value:
        _fail("is an empty string")
    return value


def _check_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        _fail(f"must be a list of {{role, content}} messages, got {_type_name(value)}")
    if not value:
        _fail("is an empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            _fail(f"message {i} must be a dict with 'role' and 'content', got {msg!r:.60}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            _fail(f"message {i} has unknown role {role!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            _fail(f"message {i} content must be a string, got {_type_name(content)}")
        if not content:
            _fail(f"message {i} content is an empty string")
        out.append({"role": role, "content": content})
    return out


def _check_turns(value: Any) -> str | list[dict[str, str]]:
    """A standard string or a conversational message list."""
    if isinstance(value, list):
        return _check_messages(value)
    if not isinstance(value, str):
        _fail(f"must be a string or a list of messages, got {_type_name(value)} {value!r:.40}")
    return _check_str(value)


def _check_turns_list(value: Any) -> list:
    if not isinstance(value, list):
        _fail(f"must be a list of completions, got {_type_name(value)}")
    if len(value) < 2:
        _fail(f"needs at least 2 completions, got {len(value)}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(_check_turns(item))
        except _FieldProblem as e:
            _fail(f"item {i} {e}")
    return out


def _check_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(f"must be a number, got {_type_name(value)} {value!r:.40}")
    if not math.isfinite(value):
        _fail(f"must be finite, got {value}")
    return float(value)


def _check_float_list(value: Any) -> list[float]:
    if not isinstance(value, list):
        _fail(f"must be a list of numbers, got {_type_name(value)}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(_check_float(item))
        except _FieldProblem as e:
            _fail(f"item {i} {e}")
    return out


def _check_key(value: Any) -> str | int:
    """A category name: a non-empty string or an integer."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        _fail(f"must be a string or an integer, got {_type_name(value)} {value!r:.40}")
    if value == "":
        _fail("is an empty string")
    return value


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(f"must be true or false, got {_type_name(value)} {value!r:.40}")
    return value


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "str": _check_str, "messages": _check_messages, "turns": _check_turns,
    "turns_list": _check_turns_list, "float": _check_float, "float_list": _check_float_list,
    "bool": _check_bool, "key": _check_key,
}

# Fields that must agree on standard (str) vs conversational (list), per format.
_TURN_FIELDS = ("prompt", "completion", "chosen", "rejected", "refinement")


def is_conversational(row: Mapping[str, Any]) -> bool:
    """True when the row's prompt/completion fields are message lists (or it has ``messages``)."""
    if "messages" in row:
        return True
    return any(isinstance(row.get(f), list) and row.get(f) and isinstance(row[f][0], Mapping)
               for f in _TURN_FIELDS)


def validate_row(row: Any, fmt: str, *, source: str | None = None,
                 line: int | None = None) -> dict[str, Any]:
    """Check one row against ``fmt`` and return it normalised.

    Normalised means: optional fields that are null are removed, numbers are floats, message
    dicts carry only role and content, and an implicit-prompt preference row gains ``prompt``.
    Columns outside the format are kept unchanged.
    """
    if not isinstance(row, Mapping):
        raise DataError(f"a row must be a JSON object, got {_type_name(row)}",
                        source=source, line=line)
    spec = FORMATS.get(fmt)
    out = dict(row)
    implicit = fmt == "preference" and row.get("prompt") is None
    if implicit:
        out.pop("prompt", None)
    fields = [(f, k, True) for f, k in spec.required.items() if not (implicit and f == "prompt")]
    fields += [(f, k, False) for f, k in spec.optional.items()]
    for field, kind, required in fields:
        value = row.get(field)
        if value is None:
            if required:
                problem = "is missing" if field not in row else "is null"
                raise DataError(f"{problem} (format '{fmt}' needs {_needs(spec)})",
                                source=source, line=line, field=field)
            out.pop(field, None)
            continue
        try:
            out[field] = _CHECKS[kind](value)
        except _FieldProblem as e:
            raise DataError(str(e), source=source, line=line, field=field) from None
    if spec.one_of and not any(f in out for f in spec.one_of):
        first = spec.one_of[0]
        problem = "is null" if first in row else "is missing"
        raise DataError(f"{problem} (format '{fmt}' needs {_needs(spec)})", source=source,
                        line=line, field=first)

    if fmt == "ranked" and len(out["completions"]) != len(out["scores"]):
        raise DataError(f"has {len(out['scores'])} scores for {len(out['completions'])} "
                        "completions; they must have equal lengths", source=source, line=line,
                        field="scores")
    if implicit:
        try:
            out["prompt"], out["chosen"], out["rejected"] = split_implicit_prompt(
                out["chosen"], out["rejected"])
        except _FieldProblem as e:
            raise DataError(str(e), source=source, line=line, field="prompt") from None
    _check_consistent_turns(out, fmt, source, line)
    return out


def _check_consistent_turns(row: dict, fmt: str, source: str | None, line: int | None) -> None:
    present = [f for f in _TURN_FIELDS if f in row and f in _format_fields(fmt)]
    if fmt == "ranked":
        kinds = {isinstance(c, list) for c in row["completions"]}
        if len(kinds) > 1 or kinds != {isinstance(row["prompt"], list)}:
            raise DataError("completions must all be strings or all message lists, like "
                            "'prompt'", source=source, line=line, field="completions")
    if not present:
        return
    first = isinstance(row[present[0]], list)
    for f in present[1:]:
        if isinstance(row[f], list) != first:
            want = "a list of messages" if first else "a string"
            raise DataError(f"must be {want} like '{present[0]}' (a row is either all strings "
                            "or all conversational)", source=source, line=line, field=f)


def _format_fields(fmt: str) -> set[str]:
    spec = FORMATS.get(fmt)
    return set(spec.required) | set(spec.optional)


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split TRL's implicit-prompt pair into ``(prompt, chosen, rejected)``.

    Strings: the prompt is their longest common prefix, cut back to the start of a whitespace
    run so each completion begins at a word boundary ("A: yes"/"A: no" → "A:", " yes", " no").
    Message lists: the prompt is the shared leading messages.
    """
    if isinstance(chosen, list) != isinstance(rejected, list):
        _fail("cannot extract an implicit prompt: 'chosen' and 'rejected' must both be strings "
              "or both be message lists")
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            _fail("no 'prompt' column and 'chosen'/'rejected' share no leading messages")
        if n == len(chosen) or n == len(rejected):
            _fail("no 'prompt' column and one of 'chosen'/'rejected' is a prefix of the other, "
                  "so it has no completion left")
        return chosen[:n], chosen[n:], rejected[n:]

    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    # A cut at p leaves both completions non-empty and starting with whitespace.
    for p in range(min(common, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[p].isspace() and rejected[p].isspace():
            while p > 0 and chosen[p - 1].isspace():
                p -= 1
            if p > 0:
                return chosen[:p], chosen[p:], rejected[p:]
            break
    _fail("no 'prompt' column and 'chosen'/'rejected' share no prefix ending at a word "
          "boundary; add an explicit 'prompt' column")
    raise AssertionError  # unreachable: _fail raises
