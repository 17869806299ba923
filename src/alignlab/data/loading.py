"""Load validated rows from JSONL, Parquet, a ``save_to_disk`` folder, the Hub, or memory.

Every row is validated when it is loaded, so a malformed row fails here with its file and
position, not later inside tokenisation or a loss. Positions are what the user would look up:
for JSONL the 1-based line number (what an editor shows), for Parquet, ``datasets`` and
in-memory data the 0-based row index (what ``ds[i]`` takes).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from alignlab.core.errors import ConfigError, DataError
from alignlab.data.formats import FORMATS, check_format_columns, detect_format, validate_row

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class RowSet:
    """Validated rows of one format, with where each came from (for error messages)."""

    format: str
    rows: list[dict[str, Any]]
    source: str
    positions: list[int] = field(default_factory=list)
    position_kind: str = "row"  # "line" (JSONL, 1-based) or "row" (0-based index)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def where(self, i: int) -> tuple[str, int]:
        """``(source, line-or-row)`` of row ``i``, as used in ``DataError``."""
        return self.source, (self.positions[i] if self.positions else i)

    def error(self, i: int, problem: str, field: str | None = None) -> DataError:
        """A ``DataError`` that points at row ``i``."""
        source, line = self.where(i)
        return DataError(problem, source=source, line=line, field=field)


def load_rows(source: str | Path, *, format: str | None = None, split: str = "train",
              limit: int | None = None) -> RowSet:
    """Load and validate rows from a file, a ``save_to_disk`` folder or a Hub dataset name.

    ``format`` is detected from the first row's columns when not given. ``limit`` keeps the
    first ``limit`` rows (read lazily where the source allows it).
    """
    if format is not None and format not in FORMATS:
        FORMATS.get(format)  # raises ConfigError listing the allowed formats
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    path = Path(source)
    name = str(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in _JSONL_SUFFIXES:
            return _validate(_read_json(path, name), format, name, "line", limit)
        if suffix in _PARQUET_SUFFIXES:
            return _validate(_read_parquet(path, name), format, name, "row", limit)
        raise DataError(f"unsupported file type '{path.suffix}'; use .jsonl, .json or .parquet",
                        source=name)
    if path.is_dir():
        return _validate(_read_dataset_folder(path, name, split), format, name, "row", limit)
    if path.suffix.lower() in _JSONL_SUFFIXES + _PARQUET_SUFFIXES:
        raise DataError("file not found", source=name)
    return _validate(_read_hub(name, split), format, f"{name}[{split}]", "row", limit)


def rows_from_list(rows: Iterable[Mapping[str, Any]], *, format: str | None = None,
                   source: str = "<memory>") -> RowSet:
    """Validate in-memory rows; positions are row indices."""
    if format is not None:
        FORMATS.get(format)
    return _validate(enumerate(rows), format, source, "row", None)


def _validate(numbered: Iterable[tuple[int, Any]], fmt: str | None, source: str, kind: str,
              limit: int | None) -> RowSet:
    rows, positions = [], []
    for pos, row in islice(numbered, limit):
        if not rows:
            if not isinstance(row, Mapping):
                raise DataError(f"a row must be a JSON object, got {type(row).__name__}",
                                source=source, line=pos)
            if fmt is None:
                fmt = detect_format(row, source=source, line=pos)
            else:
                check_format_columns(fmt, row, source=source, line=pos)
        rows.append(validate_row(row, fmt, source=source, line=pos))
        positions.append(pos)
    if not rows:
        raise DataError("contains no rows", source=source)
    return RowSet(format=fmt, rows=rows, source=source, positions=positions, position_kind=kind)


def _read_json(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    """JSON lines (1-based line numbers), or a single top-level JSON array (row indices)."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        raw = path.read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 (byte {e.start})", source=name,
                            line=raw[:e.start].count(b"\n") + 1) from None
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", source=name,
                            line=e.lineno) from None
        yield from enumerate(data)
        return
    with path.open("rb") as f:
        for lineno, raw_line in enumerate(f, start=1):
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 (column {e.start + 1})", source=name,
                                line=lineno) from None
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", source=name,
                                line=lineno) from None


def _read_parquet(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read Parquet file: {e}", source=name) from None
    index = 0
    for batch in reader.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def _read_dataset_folder(path: Path, name: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    if not ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        yield from _read_hub(str(path), split)
        return
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"cannot read datasets folder: {e}", source=name) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"has no split '{split}'; splits: {', '.join(ds)}", source=name)
        ds = ds[split]
    yield from enumerate(ds)


def _read_hub(name: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except ValueError as e:  # unknown split and similar: the dataset itself was found
        raise DataError(str(e).splitlines()[0], source=name) from None
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"dataset not found locally (no such file or folder) and could not be "
                        f"fetched from the Hub ({reason})", source=name) from None
    yield from enumerate(ds)
