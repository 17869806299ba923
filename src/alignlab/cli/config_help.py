"""``alignlab train NAME --help``: the trainer's config sections and fields, from its typed config.

Each field shows its type, default and the description taken from the attribute docstring in the
config class (pydantic's ``use_attribute_docstrings``), so the help cannot drift from the code.
"""

from __future__ import annotations

import textwrap
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

_WIDTH = 100


def config_help(name: str, config_cls: type[BaseModel], doc: str) -> str:
    """The help text of ``alignlab train name``."""
    lines = [f"Usage: alignlab train {name} [--config FILE.yaml] [--set SECTION.FIELD=VALUE ...]",
             "", *textwrap.wrap(" ".join(doc.split()), _WIDTH), "",
             "Config sections (YAML top-level keys); every field can be overridden with --set."]
    for section, field in config_cls.model_fields.items():
        model = _model_of(field.annotation)
        lines.append("")
        if model is None:
            lines.append(_field_line(section, field, indent=""))
            continue
        title = f"{section}:"
        summary = _first_sentence(field.description or model.__doc__ or "")
        lines.append(f"{title}  {summary}" if summary else title)
        for fname, sub in model.model_fields.items():
            lines.append(_field_line(fname, sub, indent="  "))
            nested = _model_of(sub.annotation)
            if nested is not None:  # e.g. model.lora
                lines.extend(_field_line(f"{fname}.{n}", f, indent="    ")
                             for n, f in nested.model_fields.items())
    return "\n".join(lines)


def _field_line(name: str, field: FieldInfo, indent: str) -> str:
    head = f"{indent}{name}: {_type_name(field.annotation)} = {_default(field)}"
    desc = " ".join((field.description or "").split())
    if not desc:
        return head
    body = textwrap.fill(desc, _WIDTH, initial_indent=indent + "    ",
                         subsequent_indent=indent + "    ")
    return f"{head}\n{body}"


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that needs the validated data
            return "(computed)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "{...}"
    return repr(value)


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", str(ann))


def _model_of(ann: Any) -> type[BaseModel] | None:
    """The config class a field holds (``Section`` or ``Section | None``), else None."""
    for a in (ann, *typing.get_args(ann)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


__all__ = ["config_help"]
