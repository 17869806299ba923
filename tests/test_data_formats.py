"""Row formats: detection, validation messages, implicit prompts."""

import pytest

from alignlab.core.errors import ConfigError, DataError
from alignlab.data.formats import FORMATS, detect_format, split_implicit_prompt, validate_row
from alignlab.data.loading import rows_from_list

USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("columns, expected", [
    (["messages"], "messages"),
    (["prompt", "chosen", "rejected"], "preference"),
    (["chosen", "rejected"], "preference"),
    (["prompt", "chosen", "rejected", "margin"], "preference"),
    (["prompt", "completions", "scores"], "ranked"),
    (["prompt", "completion", "feedback"], "language_feedback"),
    (["prompt", "completion", "label"], "unpaired"),
    (["prompt", "completion", "reward"], "unpaired"),
    (["prompt", "completion"], "prompt_completion"),
    (["text"], "text"),
    (["prompt", "id"], "prompt_only"),
])
def test_detect_format_by_columns(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_unknown_columns_lists_formats():
    with pytest.raises(DataError, match="cannot tell the data format.*preference"):
        detect_format(["question", "answer"], source="x.jsonl", line=1)


def test_every_format_is_registered():
    assert set(FORMATS.names()) == {"text", "prompt_completion", "messages", "preference",
                                    "unpaired", "ranked", "prompt_only", "language_feedback"}


@pytest.mark.parametrize("fmt, row, field, problem", [
    ("prompt_completion", {"prompt": 3, "completion": "x"}, "prompt", "must be a string"),
    ("prompt_completion", {"prompt": "", "completion": "x"}, "prompt", "empty string"),
    ("prompt_completion", {"prompt": "p"}, "completion", "is missing"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": None}, "rejected", "is null"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "1"}, "margin",
     "must be a number"),
    ("messages", {"messages": [{"role": "robot", "content": "x"}]}, "messages", "unknown role"),
    ("messages", {"messages": [{"role": "user"}]}, "messages", "'role' and 'content'"),
    ("messages", {"messages": []}, "messages", "empty list"),
    ("unpaired", {"prompt": "p", "completion": "c", "label": 1}, "label", "true or false"),
    ("unpaired", {"prompt": "p", "completion": "c"}, "label", "needs prompt, completion and label and/or reward"),
    ("unpaired", {"prompt": "p", "completion": "c", "label": None}, "label", "is null"),
    ("unpaired", {"prompt": "p", "completion": "c", "reward": "high"}, "reward", "must be a number"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "tie": 1}, "tie", "true or false"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "group": True}, "group",
     "a string or an integer"),
    ("ranked", {"prompt": "p", "completions": ["a", "b"], "scores": [1.0]}, "scores",
     "equal lengths"),
    ("ranked", {"prompt": "p", "completions": ["a"], "scores": [1.0]}, "completions",
     "at least 2"),
    ("ranked", {"prompt": "p", "completions": ["a", 2], "scores": [1.0, 2]}, "completions",
     "item 1"),
    ("preference", {"prompt": [USER], "chosen": "a", "rejected": [BOT]}, "chosen",
     "list of messages like 'prompt'"),
    ("language_feedback", {"prompt": "p", "completion": "c", "feedback": ""}, "feedback",
     "empty string"),
])
def test_validation_names_source_line_and_field(fmt, row, field, problem):
    with pytest.raises(DataError) as info:
        validate_row(row, fmt, source="data.jsonl", line=7)
    message = str(info.value)
    assert message.startswith(f"data.jsonl:7: field '{field}'")
    assert problem in message


def test_optional_null_fields_are_dropped_and_numbers_normalised():
    row = validate_row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": None, "id": 4},
                       "preference")
    assert "margin" not in row and row["id"] == 4
    row = validate_row({"prompt": "p", "completions": ["a", "b"], "scores": [1, 2]}, "ranked")
    assert row["scores"] == [1.0, 2.0]


def test_tie_group_and_reward_columns_are_kept():
    row = validate_row({"prompt": "p", "chosen": "a", "rejected": "b", "tie": True, "group": 3},
                       "preference")
    assert (row["tie"], row["group"]) == (True, 3)
    row = validate_row({"prompt": "p", "completion": "c", "reward": 2}, "unpaired")
    assert row["reward"] == 2.0 and "label" not in row
    with pytest.raises(DataError, match="missing field.*'label'"):
        rows_from_list([{"prompt": "p", "completion": "c", "x": 1}], format="unpaired")


@pytest.mark.parametrize("chosen, rejected, expected", [
    ("Q: sky? A: blue", "Q: sky? A: red", ("Q: sky? A:", " blue", " red")),
    ("The answer is 42.", "The answer is 43.", ("The answer is", " 42.", " 43.")),
    ("A: yes", "A: yes please", ("A:", " yes", " yes please")),
    ("Say\n\nhi there", "Say\n\nbye", ("Say", "\n\nhi there", "\n\nbye")),
])
def test_implicit_prompt_strings_cut_at_word_boundary(chosen, rejected, expected):
    assert split_implicit_prompt(chosen, rejected) == expected


def test_implicit_prompt_conversational_takes_shared_messages():
    system = {"role": "system", "content": "be nice"}
    good, bad = {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}
    row = validate_row({"chosen": [system, USER, good], "rejected": [system, USER, bad]},
                       "preference")
    assert row["prompt"] == [system, USER]
    assert row["chosen"] == [good] and row["rejected"] == [bad]


def test_implicit_prompt_without_shared_prefix_is_an_error():
    with pytest.raises(DataError, match="field 'prompt'.*share no prefix"):
        validate_row({"chosen": "yes", "rejected": "no"}, "preference", source="f", line=2)
    with pytest.raises(DataError, match="share no leading messages"):
        validate_row({"chosen": [BOT], "rejected": [USER, BOT]}, "preference")


def test_explicit_format_mismatch_names_missing_fields():
    with pytest.raises(DataError, match="missing field.*'chosen', 'rejected'"):
        rows_from_list([{"prompt": "p", "completion": "c"}], format="preference")


def test_unknown_format_name_is_a_config_error():
    with pytest.raises(ConfigError, match="allowed values"):
        rows_from_list([{"text": "x"}], format="pairs")


def test_rows_from_list_reports_row_index():
    rows = [{"text": "a"}, {"text": "b"}, {"text": 5}]
    with pytest.raises(DataError, match=r"^<memory>:2: field 'text': must be a string"):
        rows_from_list(rows)
