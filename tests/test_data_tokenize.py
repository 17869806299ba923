"""Rows → examples: loss masks, chat-template assistant spans, truncation policies."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from alignlab.core.errors import ConfigError, DataError
from alignlab.data.loading import rows_from_list
from alignlab.data.tokenize import tokenize_rows

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ("the sky is blue red green grass what color be brief yes no a b c d e f g h "
         "wrong good right q : ?").split()
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> "
            "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer(pad=True):
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    extra = {"pad_token": "<pad>"} if pad else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", **extra)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_text(tok, example):
    return " ".join(tok.convert_ids_to_tokens(
        [t for t, m in zip(example["input_ids"], example["loss_mask"]) if m]))


def test_text_trains_every_token_but_the_first(tok):
    out = tokenize_rows(rows_from_list([{"text": "the sky is blue"}]), tok)
    (example,) = out.examples
    assert example["input_ids"] == [tok.bos_token_id, *ids(tok, "the sky is blue"),
                                    tok.eos_token_id]
    assert example["loss_mask"] == [0, 1, 1, 1, 1, 1]
    assert (out.kept, out.truncated, out.dropped) == (1, 0, 0) and out.pad_token_id == 0


def test_prompt_completion_masks_the_prompt(tok):
    rows = rows_from_list([{"prompt": "what color is the sky", "completion": " blue"}])
    (example,) = tokenize_rows(rows, tok).examples
    prompt = [tok.bos_token_id, *ids(tok, "what color is the sky")]
    assert example["input_ids"] == prompt + [*ids(tok, "blue"), tok.eos_token_id]
    assert example["loss_mask"] == [0] * len(prompt) + [1, 1]
    (whole,) = tokenize_rows(rows, tok, completion_only_loss=False).examples
    assert whole["loss_mask"] == [0] + [1] * (len(prompt) + 1)


def test_chat_template_assistant_spans(tok):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "what color is the sky"},
                {"role": "assistant", "content": "blue"},
                {"role": "user", "content": "the grass ?"},
                {"role": "assistant", "content": "green"}]
    rows = rows_from_list([{"messages": messages}])
    (example,) = tokenize_rows(rows, tok).examples
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert example["input_ids"] == ids(tok, rendered)
    assert trained_text(tok, example) == "blue <|end|> green <|end|>"
    (everything,) = tokenize_rows(rows, tok, assistant_only_loss=False).examples
    assert everything["loss_mask"] == [0] + [1] * (len(everything["input_ids"]) - 1)


def test_template_that_is_not_prefix_stable_is_a_data_error():
    tokenizer = make_tokenizer()
    # Renders the last message differently from earlier ones, so prefixes are not stable.
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.last %}<|end|> {% endif %}"
                               "<|{{ m.role }}|> {{ m.content }} {% endfor %}")
    rows = rows_from_list([{"messages": [{"role": "user", "content": "a"},
                                         {"role": "assistant", "content": "b"}]}] * 2)
    with pytest.raises(DataError, match=r"^<memory>:0: field 'messages': the chat template"):
        tokenize_rows(rows, tokenizer)


def test_conversational_preference_uses_generation_prompt(tok):
    user = {"role": "user", "content": "what color is the sky"}
    rows = rows_from_list([{"chosen": [user, {"role": "assistant", "content": "blue"}],
                            "rejected": [user, {"role": "assistant", "content": "red"}]}])
    (example,) = tokenize_rows(rows, tok).examples
    prompt_text = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert example["prompt_ids"] == ids(tok, prompt_text)
    assert example["chosen_ids"] == [*ids(tok, "blue <|end|>"), tok.eos_token_id]
    assert example["rejected_ids"] == [*ids(tok, "red <|end|>"), tok.eos_token_id]


def test_pairwise_formats(tok):
    eos = tok.eos_token_id
    pref = tokenize_rows(rows_from_list(
        [{"prompt": "q : sky", "chosen": " blue", "rejected": " red", "margin": 2}]), tok)
    assert pref.examples == [{"prompt_ids": [tok.bos_token_id, *ids(tok, "q : sky")],
                              "chosen_ids": [*ids(tok, "blue"), eos],
                              "rejected_ids": [*ids(tok, "red"), eos], "margin": 2.0}]
    (unpaired,) = tokenize_rows(rows_from_list(
        [{"prompt": "sky", "completion": " red", "label": False}]), tok).examples
    assert unpaired["completion_ids"] == [*ids(tok, "red"), eos] and unpaired["label"] is False
    (tied,) = tokenize_rows(rows_from_list(
        [{"prompt": "sky", "chosen": " a", "rejected": " b", "tie": True, "group": "x"}]), tok).examples
    assert (tied["tie"], tied["group"]) == (True, "x")
    (scored,) = tokenize_rows(rows_from_list([{"prompt": "sky", "completion": " red", "reward": 1}]),
                              tok).examples
    assert scored["reward"] == 1.0 and "label" not in scored
    (ranked,) = tokenize_rows(rows_from_list(
        [{"prompt": "sky", "completions": [" blue", " red green"], "scores": [1, 0]}]), tok
    ).examples
    assert ranked["completion_ids"] == [[*ids(tok, "blue"), eos], [*ids(tok, "red green"), eos]]
    assert ranked["scores"] == [1.0, 0.0]
    (only,) = tokenize_rows(rows_from_list([{"prompt": "the sky", "id": 3}]), tok,
                            keep_columns=["id"]).examples
    assert only == {"prompt_ids": [tok.bos_token_id, *ids(tok, "the sky")], "id": 3}
    (fb,) = tokenize_rows(rows_from_list([{"prompt": "sky", "completion": " red",
                                           "feedback": "wrong", "refinement": " blue"}]), tok
                          ).examples
    assert fb["feedback_ids"] == ids(tok, "wrong")
    assert fb["refinement_ids"] == [*ids(tok, "blue"), eos]


LONG = {"prompt": "a b c d e f", "chosen": " yes no", "rejected": " no"}  # 7 + 3 / 2 tokens


def test_keep_end_of_prompt_drops_prompt_tokens_from_the_left_keeping_bos(tok):
    short = {"prompt": "a", "chosen": " yes", "rejected": " no"}
    out = tokenize_rows(rows_from_list([LONG, short]), tok, max_length=6)
    first = out.examples[0]
    assert first["prompt_ids"] == [tok.bos_token_id, *ids(tok, "e f")]
    assert first["chosen_ids"] == [*ids(tok, "yes no"), tok.eos_token_id]
    assert (out.kept, out.truncated, out.dropped) == (2, 1, 0)
    assert out.summary().startswith("preference: 2 rows kept (1 truncated), 0 dropped")


def test_truncate_completion_cuts_the_completion_end(tok):
    out = tokenize_rows(rows_from_list([LONG]), tok, max_length=9, truncation="truncate_completion")
    (example,) = out.examples
    assert len(example["prompt_ids"]) == 7
    assert example["chosen_ids"] == ids(tok, "yes no")
    assert example["rejected_ids"] == [*ids(tok, "no"), tok.eos_token_id]
    assert out.truncated == 1


def test_drop_policy_and_single_sequences(tok):
    rows = rows_from_list([{"prompt": "a b c d e f", "completion": " g"},
                           {"prompt": "a", "completion": " b"}])
    out = tokenize_rows(rows, tok, max_length=4, truncation="drop")
    assert (out.kept, out.truncated, out.dropped) == (1, 0, 1)
    text = tokenize_rows(rows_from_list([{"text": "a b c d e"}]), tok, max_length=4)
    assert text.examples[0]["input_ids"] == [tok.bos_token_id, *ids(tok, "a b c")]
    assert text.truncated == 1


def test_prompt_only_rows_are_left_truncated(tok):
    out = tokenize_rows(rows_from_list([{"prompt": "a b c d e"}]), tok, max_length=3)
    assert out.examples[0]["prompt_ids"] == [tok.bos_token_id, *ids(tok, "d e")]


def test_pad_falls_back_to_eos_with_a_note():
    out = tokenize_rows(rows_from_list([{"text": "a"}]), make_tokenizer(pad=False))
    assert out.pad_token_id == 2 and "no pad token" in out.summary()


def test_bad_options_are_config_errors(tok):
    rows = rows_from_list([{"text": "a"}])
    with pytest.raises(ConfigError, match="allowed values: keep_end_of_prompt"):
        tokenize_rows(rows, tok, truncation="left")
    with pytest.raises(ConfigError, match="max_length"):
        tokenize_rows(rows, tok, max_length=1)


# ---- truncation never leaves a row with nothing to train on (issue 15) -----------------------

LONG_CHAT = [{"role": "system", "content": "be brief " * 6},
             {"role": "user", "content": "what color is the sky"},
             {"role": "assistant", "content": "blue"}]


def test_truncated_messages_keep_the_assistant_turn(tok):
    rows = rows_from_list([{"messages": LONG_CHAT}] * 3)
    out = tokenize_rows(rows, tok, max_length=10)
    assert (out.kept, out.truncated, out.dropped) == (3, 3, 0)
    for example in out.examples:
        assert len(example["input_ids"]) == 10 and example["input_ids"][0] == tok.bos_token_id
        assert trained_text(tok, example) == "blue <|end|>"
    assert "3 rows kept their last 10 tokens" in out.summary()


@pytest.mark.parametrize("policy", ["truncate_completion", "drop"])
def test_messages_without_an_assistant_token_in_reach_are_dropped_and_counted(tok, policy):
    short = [{"role": "user", "content": "the sky ?"}, {"role": "assistant", "content": "blue"}]
    rows = rows_from_list([{"messages": LONG_CHAT}, {"messages": short}])
    out = tokenize_rows(rows, tok, max_length=10, truncation=policy)
    assert (out.kept, out.dropped) == (1, 1)
    assert trained_text(tok, out.examples[0]) == "blue <|end|>"
    if policy == "truncate_completion":
        assert "1 of the dropped rows had no assistant token" in out.summary()


def test_messages_with_no_assistant_turn_is_a_data_error(tok):
    rows = rows_from_list([{"messages": LONG_CHAT[:2]}])
    with pytest.raises(DataError, match=r"<memory>:0: field 'messages': has no assistant message"):
        tokenize_rows(rows, tok)
    assert tokenize_rows(rows, tok, assistant_only_loss=False).kept == 1


def test_sft_on_a_preference_file_names_both_formats(tmp_path):
    from alignlab.data.formats import SFT_FORMATS, check_trainer_format
    from alignlab.data.loading import load_rows

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n')
    rows = load_rows(path)
    with pytest.raises(ConfigError, match=r"pairs.jsonl: has 'preference' rows \(prompt, chosen, "
                       r"rejected\), but sft trains on 'text' \(text\), 'prompt_completion'.*"
                       r"'preference' rows are for dpo"):
        check_trainer_format(rows.format, SFT_FORMATS, trainer="sft", source=rows.source)
