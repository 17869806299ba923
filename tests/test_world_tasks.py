import random
import re
import statistics

import pytest

from alignlab.core.errors import ConfigError
from alignlab.world import language as lang
from alignlab.world.tasks import TASKS, make_task


@pytest.mark.parametrize("name", ["positive", "arithmetic", "positive_short"])
def test_splits_are_disjoint_sized_and_seeded(name):
    task = make_task(name, seed=0, n_train=200, n_eval=50)
    assert task.name == name and task.description and task.max_new_tokens > 0
    assert len(task.train_prompts) == len(set(task.train_prompts)) == 200
    assert len(task.eval_prompts) == len(set(task.eval_prompts)) == 50
    assert not set(task.train_prompts) & set(task.eval_prompts)
    assert make_task(name, seed=0, n_train=200, n_eval=50).train_prompts == task.train_prompts
    assert make_task(name, seed=1, n_train=200, n_eval=50).train_prompts != task.train_prompts
    assert all(not p.endswith(" ") for p in task.train_prompts + task.eval_prompts)

    demos = task.demonstrations(20, seed=3)
    assert demos == task.demonstrations(20, seed=3)
    assert {d["prompt"] for d in demos} <= set(task.train_prompts)
    assert all(d["completion"].startswith(" ") and lang.END not in d["completion"] for d in demos)
    prompts, completions = [d["prompt"] for d in demos], [d["completion"] for d in demos]
    criteria = task.criteria(prompts, completions)
    assert set(criteria) == set(task.criteria_weights)
    assert all(len(v) == 20 for v in criteria.values())
    assert len(task.gold(prompts, completions)) == 20


def test_registry_and_split_errors():
    assert {"positive", "arithmetic", "positive_short"} <= set(TASKS.names())
    with pytest.raises(ConfigError, match="allowed values"):
        make_task("no_such_task")
    with pytest.raises(ConfigError, match="distinct prompts"):
        make_task("arithmetic", n_train=2500, n_eval=1)


def test_prompts_match_the_corpus_format():
    corpus = lang.generate_corpus(0, 400, chat_fraction=0.0)
    review_prompts = make_task("positive", n_train=400, n_eval=100).train_prompts
    review_re = re.compile(r"^review of the [a-z ]+ :( [a-z ]+ \.)? the [a-z ]+ (was|were)$")
    assert all(review_re.match(p) for p in review_prompts)
    prefixes = {p.text for p in lang.all_review_prefixes()}
    assert set(review_prompts) <= prefixes
    for doc in corpus:
        if doc.startswith("question"):
            a, b = map(int, re.findall(r"\d+", doc)[:2])
            assert doc.startswith(lang.arithmetic_prompt(a, b) + " ")
    assert make_task("arithmetic").train_prompts[0] == lang.arithmetic_prompt(
        *map(int, re.findall(r"\d+", make_task("arithmetic").train_prompts[0])))


def test_gold_on_hand_written_completions():
    positive = make_task("positive", n_train=10, n_eval=10)
    p = positive.train_prompts[0]
    great, terrible = positive.gold([p, p], [" great .", " terrible ."])
    assert great > 0.5 and terrible < 0

    arithmetic = make_task("arithmetic", n_train=10, n_eval=10)
    q = "question : 12 + 7 = ? answer :"
    assert arithmetic.gold([q, q, q], [" 19 .", " 20 .", " . ."]) == [1.0, 0.0, 0.0]
    demos = arithmetic.demonstrations(30, seed=0)
    assert arithmetic.gold([d["prompt"] for d in demos], [d["completion"] for d in demos]) == [1.0] * 30


def test_positive_demonstrations_beat_corpus_reviews():
    task = make_task("positive", n_train=300, n_eval=50)
    demos = task.demonstrations(200, seed=0)
    demo_gold = task.gold([d["prompt"] for d in demos], [d["completion"] for d in demos])

    rng = random.Random(0)
    prompts, completions = [], []
    for _ in range(200):
        prefix = lang.random_review_prefix(rng)
        prompts.append(prefix.text)
        completions.append(lang.complete_review(rng, prefix, rng.betavariate(0.8, 0.8)))
    corpus_gold = task.gold(prompts, completions)
    assert statistics.mean(demo_gold) > 0.5 > statistics.mean(corpus_gold) + 0.3
    assert min(demo_gold) > 0


def test_positive_short_criteria_conflict():
    task = make_task("positive_short", n_train=10, n_eval=10)
    assert task.train_prompts == make_task("positive", n_train=10, n_eval=10).train_prompts
    p = task.train_prompts[0]
    short, long = " good .", " very good . the staff were friendly and the view was lovely . i would recommend it ."
    crit = task.criteria([p, p], [short, long])
    assert crit["sentiment"][1] > crit["sentiment"][0]
    assert crit["brevity"][1] < crit["brevity"][0]
    gold = task.gold([p, p], [short, long])
    assert gold == pytest.approx([0.5 * s + 0.5 * b for s, b in zip(crit["sentiment"], crit["brevity"])])
    demos = task.demonstrations(50, seed=0)
    assert all(d["completion"].count(" .") == 1 for d in demos)
    assert statistics.mean(task.gold([d["prompt"] for d in demos], [d["completion"] for d in demos])) > 0.6
