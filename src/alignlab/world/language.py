"""The feedback world's language: restaurant/hotel/museum reviews and addition problems.

Every text is lowercase, space-separated tokens with spaced punctuation, e.g.

    review of the cafe : the soup was very good . the staff were rude but the view was lovely .
    question : 12 + 7 = ? answer : 19 .
    <|user|> what is 12 + 7 ?<|end|><|assistant|> 19 .<|end|>

Sentiment words are taken from VADER's lexicon (positive words have valence > 0, negative
words < 0, neutral words are absent), so the world's gold sentiment reward (VADER compound)
reads exactly the signal the grammar writes. Each review draws a latent sentiment
``p ~ Beta(0.8, 0.8)`` and makes every sentiment slot positive with probability ``p``, so a
corpus, and a model pretrained on it, is mixed in sentiment. A fraction of the corpus'
arithmetic answers are wrong, so a base model is mixed in correctness too.

Markers: ``<|user|>``, ``<|assistant|>``, ``<|system|>`` open a chat turn and ``END``
(``<|end|>``) closes it. ``END`` is also the end-of-sequence token. A corpus document never
ends with it: like every ``text`` row, it is trained on as ``document + eos`` (the data
pipeline appends eos), and for a chat document that eos is the ``<|end|>`` closing the last
turn. There is no BOS token; ``PAD`` (``<|pad|>``) is only used for padding.

Prompt/completion convention (TRL's): ``prompt + completion`` is the full text; a prompt has no
trailing space and a completion starts with one (``" very good ."``), so tokenizing the two
separately gives the same tokens as tokenizing their concatenation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PAD = "<|pad|>"
END = "<|end|>"
EOS = END
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
ROLE_MARKERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
SPECIAL_TOKENS = [PAD, END, USER, ASSISTANT, SYSTEM]  # token ids 0..4 in this order

# VADER valences (vaderSentiment 3.3.2) are noted where a word's strength matters.
POSITIVE_ADJECTIVES = [
    "great", "good", "excellent", "amazing", "wonderful", "friendly", "lovely", "nice",
    "fantastic", "perfect", "pleasant", "beautiful", "charming", "awesome", "superb",
    "brilliant", "impressive", "outstanding", "delightful", "gorgeous", "elegant", "kind",
]
NEGATIVE_ADJECTIVES = [
    "bad", "terrible", "awful", "horrible", "rude", "boring", "dirty", "disappointing",
    "poor", "ugly", "unfriendly", "dull", "nasty", "gross", "lousy", "annoying", "unpleasant",
    "messy", "weak", "pathetic", "miserable", "disgusting",
]
NEUTRAL_ADJECTIVES = ["small", "big", "busy", "quiet", "simple", "new", "old", "full", "modern", "typical"]
# Category-specific sentiment adjectives, used only with nouns of that category.
CATEGORY_ADJECTIVES = {
    "food": (["delicious", "fresh", "sweet"], []),
    "lodging": (["comfortable", "clean", "relaxing", "peaceful"], ["uncomfortable", "broken"]),
    "sights": (["interesting", "fascinating", "fun", "stunning"], ["lame", "painful"]),
}
POSITIVE_VERBS = ["loved", "liked", "enjoyed", "adored"]
NEGATIVE_VERBS = ["hated", "disliked", "regretted"]
BOOSTERS = ["very", "really", "quite", "so", "extremely"]
POSITIVE_CLOSINGS = ["i would recommend it .", "i would definitely come back .", "we had fun ."]
NEGATIVE_CLOSINGS = ["i would not recommend it .", "i was disappointed .", "what a waste ."]
OPENERS = [
    "we went on a monday .", "we went on a sunday .", "we came for lunch .",
    "we came for dinner .", "i went there with my family .", "we stayed for two nights .",
    "i visited last week .", "we went there after work .", "it was our first visit .",
    "we arrived in the evening .",
]

# place -> category; nouns by category, plural ones take "were".
PLACES = {
    "the cafe": "food", "the restaurant": "food", "the bakery": "food", "the diner": "food",
    "the pizzeria": "food", "the bistro": "food", "the bar": "food", "the tea house": "food",
    "the hotel": "lodging", "the hostel": "lodging", "the inn": "lodging",
    "the resort": "lodging", "the guest house": "lodging",
    "the museum": "sights", "the gallery": "sights", "the zoo": "sights", "the park": "sights",
    "the theater": "sights", "the cinema": "sights", "the aquarium": "sights",
}
COMMON_NOUNS = ["staff", "service", "music", "price", "location", "view", "entrance", "place"]
CATEGORY_NOUNS = {
    "food": ["food", "soup", "coffee", "pizza", "bread", "cake", "dessert", "pasta", "salad",
             "wine", "tea", "menu", "portions", "waiter", "table", "fries", "burger", "noodles"],
    "lodging": ["room", "bed", "bathroom", "breakfast", "pool", "lobby", "shower", "wifi",
                "towels", "pillows", "balcony", "receptionist", "garden", "gym"],
    "sights": ["exhibits", "guide", "tour", "tickets", "seats", "show", "film", "animals",
               "paintings", "garden", "shop", "gift shop", "audio guide", "building"],
}
PLURAL_NOUNS = {"staff", "portions", "fries", "noodles", "towels", "pillows", "exhibits",
                "tickets", "seats", "animals", "paintings"}

PERSON_NOUNS = {"staff", "waiter", "receptionist", "guide"}
PERSON_ONLY_ADJECTIVES = {"friendly", "kind", "rude", "unfriendly"}
THING_ONLY_ADJECTIVES = {"gorgeous", "elegant", "dirty", "messy", "weak", "disgusting", "ugly", "gross"}

MAX_OPERAND = 49

_BETA = (0.8, 0.8)  # U-shaped: many clearly positive and clearly negative reviews, some mixed


def verb_for(noun: str) -> str:
    return "were" if noun in PLURAL_NOUNS else "was"


def nouns_for(place: str) -> list[str]:
    return COMMON_NOUNS + CATEGORY_NOUNS[PLACES[place]]


def sentiment_adjectives(place: str, noun: str, positive: bool) -> list[str]:
    """Adjectives that fit ``noun`` at ``place``: people get person words, things get the rest."""
    if noun in PERSON_NOUNS:
        return [a for a in (POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES)
                if a not in THING_ONLY_ADJECTIVES]
    pos_extra, neg_extra = CATEGORY_ADJECTIVES[PLACES[place]]
    general = POSITIVE_ADJECTIVES + pos_extra if positive else NEGATIVE_ADJECTIVES + neg_extra
    return [a for a in general if a not in PERSON_ONLY_ADJECTIVES]


def lexicon() -> list[str]:
    """Every word the grammar can emit (the world's vocabulary)."""
    texts = [*POSITIVE_ADJECTIVES, *NEGATIVE_ADJECTIVES, *NEUTRAL_ADJECTIVES, *POSITIVE_VERBS,
             *NEGATIVE_VERBS, *BOOSTERS, *POSITIVE_CLOSINGS, *NEGATIVE_CLOSINGS, *OPENERS,
             *PLACES, *COMMON_NOUNS, "review of : and but was were i the ? question answer",
             "+ = what is write a review of", *[str(i) for i in range(2 * MAX_OPERAND + 4)]]
    for pos, neg in CATEGORY_ADJECTIVES.values():
        texts += pos + neg
    for nouns in CATEGORY_NOUNS.values():
        texts += nouns
    return sorted({w for t in texts for w in t.split()})


# ---------------------------------------------------------------------------------- reviews
@dataclass(frozen=True)
class ReviewPrefix:
    """A review up to its first sentiment slot: ``review of {place} : [opener] the {noun} was``."""

    place: str
    noun: str
    opener: str | None = None

    @property
    def text(self) -> str:
        opener = f" {self.opener}" if self.opener else ""
        return f"review of {self.place} :{opener} the {self.noun} {verb_for(self.noun)}"


def all_review_prefixes() -> list[ReviewPrefix]:
    """Every review prefix the grammar can produce, in a fixed order."""
    return [ReviewPrefix(place, noun, opener)
            for place in PLACES for opener in (None, *OPENERS) for noun in nouns_for(place)]


def random_review_prefix(rng: random.Random) -> ReviewPrefix:
    place = rng.choice(list(PLACES))
    opener = rng.choice(OPENERS) if rng.random() < 0.3 else None
    return ReviewPrefix(place, rng.choice(nouns_for(place)), opener)


def _adjective(rng: random.Random, place: str, noun: str, positive: bool) -> str:
    adj = rng.choice(sentiment_adjectives(place, noun, positive))
    return f"{rng.choice(BOOSTERS)} {adj}" if rng.random() < 0.3 else adj


def _sentence(rng: random.Random, place: str, p: float, used: set[str], last: bool) -> str:
    """One non-initial sentence; each sentiment slot is positive with probability ``p``."""
    if last and rng.random() < 0.4:
        return rng.choice(POSITIVE_CLOSINGS if rng.random() < p else NEGATIVE_CLOSINGS)
    fresh = [n for n in nouns_for(place) if n not in used] or nouns_for(place)
    noun = rng.choice(fresh)
    used.add(noun)
    kind = rng.random()
    if kind < 0.5:
        return f"the {noun} {verb_for(noun)} {_adjective(rng, place, noun, rng.random() < p)} ."
    if kind < 0.75:
        verbs = POSITIVE_VERBS if rng.random() < p else NEGATIVE_VERBS
        return f"i {rng.choice(verbs)} the {noun} ."
    return f"the {noun} {verb_for(noun)} {rng.choice(NEUTRAL_ADJECTIVES)} ."


def complete_review(rng: random.Random, prefix: ReviewPrefix, p: float,
                    n_sentences: int | None = None) -> str:
    """The completion (leading space, no END) of a review starting with ``prefix``.

    ``n_sentences`` (1–4, random if None) counts the first, prefixed sentence.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"sentiment p must lie in [0, 1], got {p}")
    n = rng.randint(1, 4) if n_sentences is None else n_sentences
    used = {prefix.noun}
    first_positive = rng.random() < p
    words = [_adjective(rng, prefix.place, prefix.noun, first_positive)]
    if n > 1 and rng.random() < 0.3:  # "x was good and/but the y was bad ." counts as two sentences
        noun = rng.choice([m for m in nouns_for(prefix.place) if m != prefix.noun])
        used.add(noun)
        second_positive = rng.random() < p
        conj = "and" if second_positive == first_positive else "but"
        adjective = _adjective(rng, prefix.place, noun, second_positive)
        words.append(f"{conj} the {noun} {verb_for(noun)} {adjective}")
        n -= 1
    words.append(".")
    words += [_sentence(rng, prefix.place, p, used, last=i == n - 2) for i in range(n - 1)]
    return " " + " ".join(words)


def review_body(prefix: ReviewPrefix, completion: str) -> str:
    """The review without its ``review of X :`` header (the assistant's answer in chat form)."""
    return (prefix.text + completion).split(" : ", 1)[1]


def generate_review(rng: random.Random, p: float | None = None) -> str:
    """A full review (no END); ``p`` is the probability each sentiment slot is positive (Beta if None)."""
    p = rng.betavariate(*_BETA) if p is None else p
    prefix = random_review_prefix(rng)
    return prefix.text + complete_review(rng, prefix, p)


# ---------------------------------------------------------------------------------- arithmetic
def arithmetic_prompt(a: int, b: int) -> str:
    return f"question : {a} + {b} = ? answer :"


def arithmetic_completion(answer: int) -> str:
    return f" {answer} ."


def random_operands(rng: random.Random, max_operand: int = MAX_OPERAND) -> tuple[int, int]:
    return rng.randint(0, max_operand), rng.randint(0, max_operand)


def wrong_answer(rng: random.Random, a: int, b: int) -> int:
    """A nearby wrong sum: off by 1–3, never negative."""
    offsets = [d for d in (-3, -2, -1, 1, 2, 3) if a + b + d >= 0]
    return a + b + rng.choice(offsets)


def generate_arithmetic(rng: random.Random, wrong_answer_rate: float = 0.0) -> str:
    """``question : a + b = ? answer : c .`` where c is wrong with probability ``wrong_answer_rate``."""
    a, b = random_operands(rng)
    answer = wrong_answer(rng, a, b) if rng.random() < wrong_answer_rate else a + b
    return arithmetic_prompt(a, b) + arithmetic_completion(answer)


# ---------------------------------------------------------------------------------- chat
def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """``<|role|> content<|end|>`` per message, then ``<|assistant|>`` if a reply is wanted.

    The tokenizer's Jinja ``chat_template`` renders exactly this string (tested).
    """
    parts = []
    for message in messages:
        role = message["role"]
        if role not in ROLE_MARKERS:
            raise ValueError(f"unknown chat role {role!r}; allowed: {', '.join(ROLE_MARKERS)}")
        parts.append(f"{ROLE_MARKERS[role]} {message['content'].strip()}{END}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def review_request(place: str) -> str:
    return f"write a review of {place} ."


def arithmetic_request(a: int, b: int) -> str:
    return f"what is {a} + {b} ?"


def generate_chat_review(rng: random.Random, p: float | None = None) -> str:
    p = rng.betavariate(*_BETA) if p is None else p
    prefix = random_review_prefix(rng)
    body = review_body(prefix, complete_review(rng, prefix, p))
    return render_chat([{"role": "user", "content": review_request(prefix.place)},
                        {"role": "assistant", "content": body}])


def generate_chat_arithmetic(rng: random.Random, wrong_answer_rate: float = 0.0) -> str:
    a, b = random_operands(rng)
    answer = wrong_answer(rng, a, b) if rng.random() < wrong_answer_rate else a + b
    return render_chat([{"role": "user", "content": arithmetic_request(a, b)},
                        {"role": "assistant", "content": arithmetic_completion(answer)}])


# ---------------------------------------------------------------------------------- corpus
def generate_corpus(seed: int, n_documents: int, *, arithmetic_fraction: float = 0.3,
                    chat_fraction: float = 0.1, wrong_answer_rate: float = 0.3) -> list[str]:
    """``n_documents`` pretraining documents, identical for identical arguments.

    Each document is a review or (with probability ``arithmetic_fraction``) an addition
    problem; with probability ``chat_fraction`` it is rendered as a chat exchange whose final
    ``END`` is left off, so that every document is trained on as ``document + eos``.
    """
    for name, value in [("arithmetic_fraction", arithmetic_fraction),
                        ("chat_fraction", chat_fraction), ("wrong_answer_rate", wrong_answer_rate)]:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    rng = random.Random(seed)
    documents = []
    for _ in range(n_documents):
        chat = rng.random() < chat_fraction
        arithmetic = rng.random() < arithmetic_fraction
        if chat:
            doc = (generate_chat_arithmetic(rng, wrong_answer_rate) if arithmetic
                   else generate_chat_review(rng)).removesuffix(END)
        else:
            doc = generate_arithmetic(rng, wrong_answer_rate) if arithmetic else generate_review(rng)
        documents.append(doc)
    return documents
