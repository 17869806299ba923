"""Fuzzing the data layer and the config loader (issue 15).

Files of every row format, mutated: broken JSON, invalid UTF-8, non-object rows, wrong types,
missing and null fields, empty, whitespace-only and huge strings, bad chat messages, prompts
longer than ``max_length``, duplicate ids. Loading and tokenising such a file either works,
with every row kept or dropped (counted) and every example within ``max_length`` and with
something to train on, or raises one of alignlab's typed errors naming the file (and the line
and field when a row is at fault). Config files and ``--set`` overrides likewise give a config
or a ``ConfigError``. The default run is short; ``-m slow`` runs many more examples.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignlab.core.config import load_config
from alignlab.core.errors import ConfigError, DataError
from alignlab.data.formats import FORMATS
from alignlab.data.loading import load_rows
from alignlab.data.tokenize import TRUNCATION_POLICIES, tokenize_rows

FAST = settings(max_examples=int(os.environ.get("ALIGNLAB_FUZZ_EXAMPLES", 300)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=3000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- a byte-level BPE tokenizer with a chat template (what GPT-2/Qwen2 users bring) ------------

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    raw = Tokenizer(models.BPE(vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", additional_special_tokens=specials[3:])
    tok.chat_template = TEMPLATE
    return tok


def word_level_tokenizer():
    """Whitespace-split words: whitespace-only text has no tokens at all."""
    from tests.test_data_tokenize import make_tokenizer

    return make_tokenizer()


TOKENIZERS = {"byte_level": byte_level_tokenizer(), "word_level": word_level_tokenizer()}

# ---- rows: a valid row of some format, then mutated ----------------------------------------------

short_text = st.text(min_size=1, max_size=12)
huge_text = st.text(alphabet="ab é漢", min_size=300, max_size=1500)
any_text = st.one_of(short_text, st.just(""), st.just("   "), st.just("\n\t"), huge_text)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                   st.floats(allow_nan=True, allow_infinity=True), any_text)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": short_text})
bad_message = st.one_of(
    scalar, st.fixed_dictionaries({"role": st.sampled_from(["tool", "", "USER", 3]),
                                   "content": short_text}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(scalar, st.just([]))}),
    st.fixed_dictionaries({"content": short_text}))
conversation = st.lists(message, min_size=1, max_size=4)
value = st.one_of(scalar, conversation, st.lists(st.one_of(message, bad_message), max_size=3),
                  st.lists(scalar, max_size=4), st.lists(short_text, max_size=4),
                  st.dictionaries(st.text(max_size=4), scalar, max_size=2))


def valid_row(fmt: str) -> st.SearchStrategy[dict]:
    turns = st.one_of(short_text, huge_text)
    if fmt == "text":
        return st.fixed_dictionaries({"text": turns})
    if fmt == "messages":
        return st.fixed_dictionaries({"messages": conversation})
    if fmt == "prompt_completion":
        return st.fixed_dictionaries({"prompt": turns, "completion": turns})
    if fmt == "preference":
        return st.fixed_dictionaries({"prompt": turns, "chosen": short_text, "rejected": short_text},
                                     optional={"margin": st.floats(-5, 5), "tie": st.booleans(),
                                               "group": st.one_of(short_text, st.integers())})
    if fmt == "unpaired":
        return st.fixed_dictionaries({"prompt": turns, "completion": short_text},
                                     optional={"label": st.booleans(), "reward": st.floats(-5, 5)})
    if fmt == "ranked":
        return st.integers(2, 4).flatmap(lambda k: st.fixed_dictionaries({
            "prompt": turns, "completions": st.lists(short_text, min_size=k, max_size=k),
            "scores": st.lists(st.floats(-5, 5), min_size=k, max_size=k)}))
    if fmt == "prompt_only":
        return st.fixed_dictionaries({"prompt": st.one_of(turns, conversation)})
    return st.fixed_dictionaries({"prompt": turns, "completion": short_text, "feedback": short_text},
                                 optional={"refinement": short_text})


FIELDS = ["prompt", "completion", "chosen", "rejected", "messages", "text", "label", "reward",
          "completions", "scores", "margin", "tie", "group", "feedback", "refinement", "id"]


@st.composite
def mutated_row(draw, fmt: str) -> dict:
    row = dict(draw(valid_row(fmt)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        action = draw(st.sampled_from(["drop", "replace", "add", "null"]))
        field = draw(st.sampled_from(sorted(row) if action != "add" and row else FIELDS))
        if action == "drop":
            row.pop(field, None)
        elif action == "null":
            row[field] = None
        else:
            row[field] = draw(value)
    if draw(st.booleans()):
        row["id"] = draw(st.integers(0, 3))  # duplicate ids: extra columns are kept, ignored
    return row


@st.composite
def jsonl_file(draw) -> tuple[bytes, str]:
    fmt = draw(st.sampled_from(FORMATS.names()))
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["row"] * 20 + ["broken", "not_object", "bad_utf8", "blank"]))
        if kind == "row":
            lines.append(json.dumps(draw(mutated_row(fmt)), ensure_ascii=draw(st.booleans())).encode())
        elif kind == "broken":
            text = json.dumps(draw(mutated_row(fmt)))
            lines.append(text[:draw(st.integers(0, max(len(text) - 1, 0)))].encode())
        elif kind == "not_object":
            lines.append(json.dumps(draw(st.one_of(scalar, st.lists(scalar, max_size=2)))).encode())
        elif kind == "bad_utf8":
            lines.append(b'{"text": "a\xff\xfe b"}')
        else:
            lines.append(b"   ")
    return b"\n".join(lines) + b"\n", fmt


# ---- the properties --------------------------------------------------------------------------------

ROW_FREE_PROBLEMS = ("contains no rows", "cannot read Parquet file")  # file-level: no line


def check_load_and_tokenize(content: bytes, fmt: str | None, max_length: int, truncation: str,
                            suffix: str = ".jsonl", tokenizer: str = "byte_level") -> str:
    """Load + tokenise ``content``; assert the contract; return the outcome's kind."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(content)
        try:
            rows = load_rows(path, format=fmt)
            out = tokenize_rows(rows, TOKENIZERS[tokenizer], max_length=max_length, truncation=truncation)
        except DataError as e:
            assert e.source == str(path), str(e)
            assert e.line is not None or e.problem.startswith(ROW_FREE_PROBLEMS), str(e)
            assert e.field is None or e.field in FIELDS, str(e)
            assert "\n" not in str(e)
            return "DataError"
        except ConfigError as e:
            assert "\n" not in str(e) and str(e), str(e)
            return "ConfigError"
    assert out.kept + out.dropped == len(rows), out.summary()
    for ex in out.examples:
        if "input_ids" in ex:
            assert len(ex["input_ids"]) <= max_length and len(ex["loss_mask"]) == len(ex["input_ids"])
            assert any(ex["loss_mask"]), f"nothing to train on: {ex}"
        elif "prompt_ids" in ex:
            completions = (ex.get("completion_ids") if rows.format != "preference"
                           else [ex["chosen_ids"], ex["rejected_ids"]])
            if completions is None:  # prompt_only
                assert 0 < len(ex["prompt_ids"]) <= max_length
                continue
            if completions and isinstance(completions[0], int):
                completions = [completions]
            assert all(len(c) >= 1 for c in completions), ex
            assert len(ex["prompt_ids"]) + max(map(len, completions)) <= max_length
    return "ok"


FORMAT_CHOICES = st.one_of(st.none(), st.sampled_from(FORMATS.names()))
OUTCOMES: dict[str, int] = {}


def _data_property(file_and_fmt, explicit, max_length, truncation, tokenizer):
    content, fmt = file_and_fmt
    kind = check_load_and_tokenize(content, fmt if explicit else None, max_length, truncation,
                                   tokenizer=tokenizer)
    OUTCOMES[kind] = OUTCOMES.get(kind, 0) + 1


_data_args = dict(file_and_fmt=jsonl_file(), explicit=st.booleans(),
                  max_length=st.integers(2, 48), truncation=st.sampled_from(TRUNCATION_POLICIES),
                  tokenizer=st.sampled_from(sorted(TOKENIZERS)))


@FAST
@given(**_data_args)
def test_fuzz_every_format_gives_examples_or_a_typed_error(file_and_fmt, explicit, max_length,
                                                          truncation, tokenizer):
    _data_property(file_and_fmt, explicit, max_length, truncation, tokenizer)


@pytest.mark.slow
@SLOW
@given(**_data_args)
def test_fuzz_every_format_many_examples(file_and_fmt, explicit, max_length, truncation,
                                         tokenizer):
    _data_property(file_and_fmt, explicit, max_length, truncation, tokenizer)


@FAST
@given(st.binary(max_size=200), st.sampled_from([".jsonl", ".json", ".parquet"]))
def test_fuzz_arbitrary_bytes_are_a_data_error(content, suffix):
    check_load_and_tokenize(content, None, 32, "keep_end_of_prompt", suffix)


def test_fuzz_found_cases():
    """Failures the fuzzer found, kept as plain regression tests."""
    assert check_load_and_tokenize(b'{"text": "a\xff b"}\n', None, 16, "drop") == "DataError"
    assert check_load_and_tokenize(b'\xff[\n', None, 16, "drop") == "DataError"
    assert check_load_and_tokenize(b'[{"text": "a\xff"}]', None, 16, "drop") == "DataError"
    assert check_load_and_tokenize(b'{"text": " "}\n', None, 16, "drop",
                                   tokenizer="word_level") == "ok"
    for content, overrides in [(b"\x80model: {}", []), (b"{}", ["data.source=\x1f"]),
                               (b"{}", ["train.lr=!0"]), (b"{}", ['data.source="open'])]:
        _config_property(content, overrides)


# ---- configs -----------------------------------------------------------------------------------------

SECTIONS = {"model": ["name_or_path", "dtype", "lora", "trust_remote_code"],
            "data": ["source", "format", "max_length", "truncation", "limit", "packing"],
            "train": ["output_dir", "seed", "max_steps", "batch_size", "lr", "adam_betas",
                      "precision", "save_every", "resume"],
            "world": ["preset", "seed"], "nonsense": ["x"]}
config_value = st.one_of(scalar, st.lists(scalar, max_size=3),
                         st.dictionaries(st.sampled_from(["r", "alpha", "x"]), scalar, max_size=2))


@st.composite
def config_document(draw) -> bytes:
    kind = draw(st.sampled_from(["mapping"] * 4 + ["text", "bytes", "scalar"]))
    if kind == "text":
        return draw(st.text(max_size=80)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=80))
    if kind == "scalar":
        return yaml.safe_dump(draw(st.one_of(scalar, st.lists(scalar, max_size=2)))).encode()
    doc = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=3, unique=True)):
        fields = draw(st.lists(st.sampled_from(SECTIONS[section]), max_size=3, unique=True))
        doc[section] = {f: draw(config_value) for f in fields} if draw(st.integers(0, 5)) else draw(scalar)
    return yaml.safe_dump(doc, allow_unicode=True).encode()


override = st.one_of(
    st.text(max_size=30),
    st.builds(lambda s, f, v: f"{s}.{f}={v}", st.sampled_from(sorted(SECTIONS)),
              st.sampled_from(sum(SECTIONS.values(), [])), st.text(max_size=12)))


def _config_property(content, overrides):
    from alignlab.algorithms.sft import SFTConfig

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_bytes(content)
        try:
            load_config(SFTConfig, path, overrides)
        except ConfigError as e:
            assert str(e)


@FAST
@given(config_document(), st.lists(override, max_size=3))
def test_fuzz_config_files_and_overrides_give_a_config_or_a_config_error(content, overrides):
    _config_property(content, overrides)


@pytest.mark.slow
@SLOW
@given(config_document(), st.lists(override, max_size=3))
def test_fuzz_configs_many_examples(content, overrides):
    _config_property(content, overrides)
