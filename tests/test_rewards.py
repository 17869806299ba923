import math
import subprocess
import sys

import pytest

from alignlab.core.errors import ConfigError, RewardError
from alignlab.rewards.registry import (
    REWARDS,
    check_rewards,
    completion_text,
    get_reward,
    weighted_sum,
)

Q = "question : 12 + 7 = ? answer :"


def test_builtin_rewards_are_registered_from_any_import_order():
    assert {"vader_sentiment", "arithmetic_exact", "brevity", "length_penalty"} <= set(REWARDS.names())
    code = ("import alignlab.rewards.lexical; from alignlab.rewards.registry import REWARDS; "
            "assert 'arithmetic_exact' in REWARDS and 'vader_sentiment' in REWARDS")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vader_sentiment_on_hand_written_completions():
    score = get_reward("vader_sentiment")
    great, terrible, empty, after_end = score(
        ["p"] * 4, [" the soup was great .", " terrible .", "", " fine .<|end|> terrible terrible"])
    assert great > 0.5 and terrible < 0 and empty == 0.0
    assert after_end == score(["p"], [" fine ."])[0]


def test_arithmetic_exact_right_wrong_unparsable():
    score = get_reward("arithmetic_exact")
    completions = [" 19 .", " 18 .", " nineteen .", "", " 19<|end|>", "<|end|> 19", " 19 . question : 1 + 1 = ? answer : 2 ."]
    assert score([Q] * len(completions), completions) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert score(["what is 12 + 7 ?"], [" 19 ."]) == [1.0]
    assert score(["no problem here"], [" 19 ."]) == [0.0]
    assert score(["anything"], [" 5 ."], answer=[5]) == [1.0]


def test_length_rewards():
    completions = ["", " good .", " " + " ".join(["w"] * 40)]
    assert get_reward("brevity")(["p"] * 3, completions) == [1.0, 1.0 - 2 / 32, 0.0]
    assert get_reward("brevity", max_words=4)(["p"], [" good ."]) == [0.5]
    assert get_reward("length_penalty")(["p"] * 3, completions) == [0.0, -0.2, -4.0]


def test_weighted_sum_matches_its_parts():
    prompts, completions = ["p", "p"], [" great .", " the staff were rude and the room was dirty ."]
    combined = weighted_sum({"vader_sentiment": 2.0, "brevity": -0.5}, {"brevity": {"max_words": 10}})
    sentiment = get_reward("vader_sentiment")(prompts, completions)
    brevity = get_reward("brevity", max_words=10)(prompts, completions)
    assert combined(prompts, completions, ignored_field=[1, 2]) == pytest.approx(
        [2 * s - 0.5 * b for s, b in zip(sentiment, brevity)])
    with pytest.raises(ConfigError, match="allowed values"):
        weighted_sum({"no_such_reward": 1.0})
    with pytest.raises(ConfigError, match="no weight"):
        weighted_sum({"brevity": 1.0}, {"vader_sentiment": {}})


def test_reward_contract_violations_raise_reward_error(monkeypatch):
    monkeypatch.setitem(REWARDS._items, "nan_reward", lambda prompts, completions, **f: [math.nan] * len(prompts))
    monkeypatch.setitem(REWARDS._items, "short_reward", lambda prompts, completions, **f: [0.0])
    monkeypatch.setitem(REWARDS._items, "bad_reward", lambda prompts, completions, **f: 1 / 0)
    for name in ["nan_reward", "short_reward", "bad_reward"]:
        with pytest.raises(RewardError, match=name):
            get_reward(name)(["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match="2 prompts but 1"):
        get_reward("brevity")(["a", "b"], ["x"])
    assert check_rewards([1, 2.5], 2, "r") == [1.0, 2.5]


def test_completion_text_drops_markers():
    assert completion_text(" good .<|end|><|user|> bad") == "good ."
    assert completion_text("<|assistant|> good .") == "good ."
