import hashlib

import jinja2
import pytest
from transformers import AutoTokenizer

from alignlab.world import language as lang
from alignlab.world.tasks import make_task
from alignlab.world.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return lang.generate_corpus(0, 600)


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, vocab_size=700)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_special_tokens(tok):
    assert tok.convert_ids_to_tokens(list(range(5))) == lang.SPECIAL_TOKENS
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token, tok.eos_token_id) == (lang.PAD, 0, lang.END, 1)
    assert tok.bos_token is None
    assert tok("the soup was good .")["input_ids"][-1] != tok.eos_token_id  # nothing is appended
    ids = tok(f"{lang.USER} hi{lang.END}{lang.ASSISTANT}")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and 1 in ids
    assert 600 < len(tok) <= 700


def test_round_trip(tok, corpus):
    for text in corpus[:100] + ["Unseen TEXT, with ünïcode 🙂 and  double  spaces\n"]:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_prompt_and_completion_tokenize_separately(tok):
    for name in ["positive", "arithmetic"]:
        for d in make_task(name, n_train=20, n_eval=5).demonstrations(20, seed=0):
            joint = tok(d["prompt"] + d["completion"])["input_ids"]
            assert tok(d["prompt"])["input_ids"] + tok(d["completion"])["input_ids"] == joint


def test_chat_template_matches_render_chat(tok):
    conversations = [
        [{"role": "user", "content": "what is 3 + 4 ?"}],
        [{"role": "system", "content": "be kind ."}, {"role": "user", "content": "write a review of the cafe ."},
         {"role": "assistant", "content": "the soup was good ."}],
    ]
    for messages in conversations:
        for gen in (False, True):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert text == lang.render_chat(messages, add_generation_prompt=gen)
    ids = tok.apply_chat_template(conversations[0], add_generation_prompt=True, return_dict=False)
    assert ids == tok(lang.render_chat(conversations[0], True))["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(lang.USER) and ids[-1] == tok.convert_tokens_to_ids(lang.ASSISTANT)
    with pytest.raises(jinja2.TemplateError):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_save_load_round_trip(tok, corpus, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in corpus[:50]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.chat_template == tok.chat_template
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token, len(loaded)) == (1, 0, None, len(tok))
    messages = [{"role": "user", "content": "what is 1 + 1 ?"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_training_is_deterministic(corpus, tmp_path):
    for name, texts in [("a", corpus), ("b", corpus), ("c", corpus[:300])]:
        train_tokenizer(texts, vocab_size=700).save_pretrained(tmp_path / name)
    assert _sha(tmp_path / "a" / "tokenizer.json") == _sha(tmp_path / "b" / "tokenizer.json")
    assert _sha(tmp_path / "a" / "tokenizer.json") != _sha(tmp_path / "c" / "tokenizer.json")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, vocab_size=100)
