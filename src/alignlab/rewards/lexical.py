"""Lexicon and length scorers: VADER sentiment, brevity, length penalty."""

from __future__ import annotations

import functools

from alignlab.rewards.registry import REWARDS, completion_text


@functools.cache
def _analyzer():
    # Loading VADER's lexicon takes ~0.1 s; one instance serves every call.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    return float(_analyzer().polarity_scores(text)["compound"])


def num_words(completion: str) -> int:
    """Whitespace-separated tokens of the completion text (punctuation counts: ``"good ."`` is 2)."""
    return len(completion_text(completion).split())


@REWARDS.register("vader_sentiment")
def vader_sentiment(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """VADER compound score of the completion, in [-1, 1] (Hutto & Gilbert, 2014); empty → 0."""
    return [vader_compound(completion_text(c)) for c in completions]


@REWARDS.register("brevity")
def brevity(prompts: list[str], completions: list[str], *, max_words: int = 32,
            **fields) -> list[float]:
    """``1 − min(words, max_words) / max_words``, in [0, 1]: 1 for an empty completion."""
    if max_words <= 0:
        raise ValueError(f"max_words must be positive, got {max_words}")
    return [1.0 - min(num_words(c), max_words) / max_words for c in completions]


@REWARDS.register("length_penalty")
def length_penalty(prompts: list[str], completions: list[str], *, scale: float = 10.0,
                   **fields) -> list[float]:
    """``−words / scale``: an unbounded linear penalty on completion length."""
    return [-num_words(c) / scale for c in completions]
