import hashlib
import re

import pytest
from vaderSentiment.vaderSentiment import BOOSTER_DICT, SentimentIntensityAnalyzer

from alignlab.world import language as lang

VADER = SentimentIntensityAnalyzer()


def _hash(docs):
    return hashlib.sha256("\n".join(docs).encode()).hexdigest()


@pytest.fixture(scope="module")
def corpus():
    return lang.generate_corpus(0, 2000)


def test_corpus_is_deterministic_per_seed():
    assert _hash(lang.generate_corpus(3, 200)) == _hash(lang.generate_corpus(3, 200))
    assert _hash(lang.generate_corpus(3, 200)) != _hash(lang.generate_corpus(4, 200))


def test_sentiment_words_carry_vader_valence():
    positive = lang.POSITIVE_ADJECTIVES + lang.POSITIVE_VERBS
    negative = lang.NEGATIVE_ADJECTIVES + lang.NEGATIVE_VERBS
    for pos, neg in lang.CATEGORY_ADJECTIVES.values():
        positive, negative = positive + pos, negative + neg
    assert all(VADER.lexicon.get(w, 0) > 0 for w in positive), [w for w in positive if VADER.lexicon.get(w, 0) <= 0]
    assert all(VADER.lexicon.get(w, 0) < 0 for w in negative), [w for w in negative if VADER.lexicon.get(w, 0) >= 0]
    assert not any(w in VADER.lexicon for w in lang.NEUTRAL_ADJECTIVES)
    assert all(b in BOOSTER_DICT and BOOSTER_DICT[b] > 0 for b in lang.BOOSTERS)
    assert all(VADER.polarity_scores(c)["compound"] > 0 for c in lang.POSITIVE_CLOSINGS)
    assert all(VADER.polarity_scores(c)["compound"] < 0 for c in lang.NEGATIVE_CLOSINGS)
    assert 150 <= len(lang.lexicon()) <= 600


def test_documents_are_lowercase_spaced_and_leave_eos_to_the_pipeline(corpus):
    for doc in corpus:
        assert not doc.endswith(lang.END) and doc.endswith(" .")
        text = re.sub(r"<\|[a-z]+\|>", " ", doc)
        assert text == text.lower()
        assert not re.search(r"\S[.:?]|[.:?]\S", text), doc  # punctuation is its own token
        assert "  " not in doc


def test_corpus_mixes_sentiment_and_correctness(corpus):
    reviews = [d for d in corpus if d.startswith("review of ")]
    compounds = [VADER.polarity_scores(r.split(" : ", 1)[1])["compound"] for r in reviews]
    assert sum(c > 0.05 for c in compounds) > 0.25 * len(reviews)
    assert sum(c < -0.05 for c in compounds) > 0.25 * len(reviews)

    problems = [d for d in corpus if d.startswith("question :")]
    assert abs(len(problems) / len(corpus) - 0.3 * 0.9) < 0.04
    wrong = 0
    for doc in problems:
        a, b, c = map(int, re.match(r"question : (\d+) \+ (\d+) = \? answer : (\d+) \.", doc).groups())
        assert 0 <= a <= lang.MAX_OPERAND and 0 <= b <= lang.MAX_OPERAND
        assert abs(c - (a + b)) <= 3
        wrong += c != a + b
    assert abs(wrong / len(problems) - 0.3) < 0.06

    chats = [d for d in corpus if d.startswith(lang.USER)]
    assert abs(len(chats) / len(corpus) - 0.1) < 0.03
    assert any("what is" in c for c in chats)
    turn = r"<\|user\|> [^<]+<\|end\|><\|assistant\|> [^<]+"
    assert all(re.fullmatch(turn, c) for c in chats)
    assert any("write a review of" in c for c in chats)


def test_fractions_are_respected_at_the_extremes():
    assert all(d.startswith("question :") for d in lang.generate_corpus(0, 50, arithmetic_fraction=1.0, chat_fraction=0.0))
    docs = lang.generate_corpus(0, 50, arithmetic_fraction=1.0, chat_fraction=0.0, wrong_answer_rate=0.0)
    for d in docs:
        a, b, c = map(int, re.findall(r"\d+", d))
        assert a + b == c
    assert all(d.startswith(lang.USER) for d in lang.generate_corpus(0, 50, chat_fraction=1.0))
    with pytest.raises(ValueError, match="chat_fraction"):
        lang.generate_corpus(0, 5, chat_fraction=1.5)


def test_review_sentiment_follows_p_and_length_varies():
    import random

    rng = random.Random(0)
    prefix = lang.ReviewPrefix("the cafe", "soup")
    pos = [lang.complete_review(rng, prefix, 1.0) for _ in range(50)]
    neg = [lang.complete_review(rng, prefix, 0.0) for _ in range(50)]
    assert all(c.startswith(" ") and not c.endswith(" ") for c in pos + neg)
    assert all(VADER.polarity_scores(c)["compound"] > 0 for c in pos)
    assert all(VADER.polarity_scores(c)["compound"] < 0 for c in neg)
    n_sentences = {c.count(" .") for c in pos + neg}
    assert min(n_sentences) == 1 and max(n_sentences) == 4
    assert lang.complete_review(rng, prefix, 1.0, n_sentences=1).count(" .") == 1


def test_review_prefixes_are_unique_and_start_corpus_reviews(corpus):
    texts = [p.text for p in lang.all_review_prefixes()]
    assert len(texts) == len(set(texts)) > 1000
    reviews = [d for d in corpus if d.startswith("review of ")][:200]
    for review in reviews:
        assert any(review.startswith(t + " ") for t in texts), review


def test_render_chat():
    messages = [{"role": "system", "content": "be nice ."}, {"role": "user", "content": " what is 1 + 2 ? "},
                {"role": "assistant", "content": "3 ."}]
    assert lang.render_chat(messages) == "<|system|> be nice .<|end|><|user|> what is 1 + 2 ?<|end|><|assistant|> 3 .<|end|>"
    assert lang.render_chat(messages[1:2], add_generation_prompt=True).endswith("<|end|><|assistant|>")
    with pytest.raises(ValueError, match="role"):
        lang.render_chat([{"role": "robot", "content": "x"}])
