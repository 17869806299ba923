"""Loading every format from JSONL, Parquet and a datasets folder; error positions."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignlab.core.errors import DataError
from alignlab.data.loading import load_rows, rows_from_list

USER = {"role": "user", "content": "what color is the sky"}
SAMPLES = {
    "text": [{"text": "the sky is blue"}, {"text": "grass is green"}],
    "prompt_completion": [{"prompt": "the sky is", "completion": " blue"},
                          {"prompt": "grass is", "completion": " green"}],
    "messages": [{"messages": [USER, {"role": "assistant", "content": "blue"}]},
                 {"messages": [{"role": "system", "content": "be brief"}, USER,
                               {"role": "assistant", "content": "blue"}]}],
    "preference": [{"prompt": "sky:", "chosen": " blue", "rejected": " red", "margin": 1.5},
                   {"prompt": "grass:", "chosen": " green", "rejected": " red", "margin": 0.5}],
    "unpaired": [{"prompt": "sky:", "completion": " blue", "label": True},
                 {"prompt": "sky:", "completion": " red", "label": False}],
    "ranked": [{"prompt": "sky:", "completions": [" blue", " red", " green"],
                "scores": [2.0, 0.0, 1.0]},
               {"prompt": "grass:", "completions": [" green", " red"], "scores": [1.0, 0.0]}],
    "prompt_only": [{"prompt": "the sky is"}, {"prompt": "grass is"}],
    "language_feedback": [{"prompt": "sky:", "completion": " red", "feedback": "wrong color",
                           "refinement": " blue"},
                          {"prompt": "grass:", "completion": " green", "feedback": "good",
                           "refinement": " green"}],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_dataset(path, rows, split=None):
    ds = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_every_format_loads_from_every_source(tmp_path, fmt):
    rows = SAMPLES[fmt]
    sources = [write_jsonl(tmp_path / "d.jsonl", rows), write_parquet(tmp_path / "d.parquet", rows),
               write_dataset(tmp_path / "ds", rows), write_dataset(tmp_path / "dd", rows, "train")]
    for source in sources:
        loaded = load_rows(source)
        assert loaded.format == fmt, source
        assert loaded.rows == rows, source
        assert load_rows(source, format=fmt, limit=1).rows == rows[:1]


def test_conversational_preference_and_implicit_prompt_from_parquet(tmp_path):
    bot = {"role": "assistant", "content": "blue"}
    rows = [{"chosen": [USER, bot], "rejected": [USER, {"role": "assistant", "content": "red"}]}]
    loaded = load_rows(write_parquet(tmp_path / "p.parquet", rows))
    assert loaded.format == "preference"
    assert loaded.rows[0]["prompt"] == [USER] and loaded.rows[0]["chosen"] == [bot]


def test_jsonl_positions_are_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    loaded = load_rows(path)
    assert loaded.positions == [1, 3] and loaded.position_kind == "line"
    assert loaded.where(1) == (str(path), 3)


@pytest.mark.parametrize("body, line, field, problem", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', 2, None,
     "invalid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', 2, "completion", "is missing"),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": 3, "completion": "b"}\n', 3, "prompt",
     "must be a string"),
    ('{"prompt": "a", "completion": ""}\n', 1, "completion", "empty string"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', 1, "messages", "unknown role"),
    ('{"prompt": "a", "completions": ["x", "y"], "scores": [1]}\n', 1, "scores",
     "equal lengths"),
    ('{"text": "a"}\n[1, 2]\n', 2, None, "must be a JSON object"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, body, line, field, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(body)
    with pytest.raises(DataError) as info:
        load_rows(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    if field:
        assert f"field '{field}'" in message
    assert problem in message
    error = info.value  # no chained library traceback behind the message
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_malformed_parquet_and_dataset_rows_name_row_index(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "label": True},
            {"prompt": "a", "completion": "b", "label": None}]
    with pytest.raises(DataError, match=r"u\.parquet:1: field 'label': is null"):
        load_rows(write_parquet(tmp_path / "u.parquet", rows))
    with pytest.raises(DataError, match=r"ds:1: field 'label': is null"):
        load_rows(write_dataset(tmp_path / "ds", rows))


def test_json_array_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(SAMPLES["text"]))
    assert load_rows(path).rows == SAMPLES["text"]


def test_dataset_dict_missing_split_lists_splits(tmp_path):
    path = write_dataset(tmp_path / "dd", SAMPLES["text"], "train")
    with pytest.raises(DataError, match="no split 'test'; splits: train"):
        load_rows(path, split="test")


def test_missing_file_and_unreachable_hub(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="file not found"):
        load_rows(tmp_path / "nope.jsonl")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="not found locally.*could not be fetched"):
        load_rows("no-such-org/no-such-dataset")


def test_explicit_format_and_empty_source(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", SAMPLES["prompt_completion"])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'chosen': rows do not match"):
        load_rows(path, format="preference")
    assert load_rows(path, format="prompt_only").format == "prompt_only"
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_rows(tmp_path / "e.jsonl")


def test_rows_from_list_memory_provenance():
    loaded = rows_from_list(SAMPLES["unpaired"])
    assert loaded.format == "unpaired" and loaded.source == "<memory>"
    assert loaded.where(1) == ("<memory>", 1) and len(loaded) == 2
