"""The shared parts of the online preference algorithms: label counting, identical pairs as
free ties, the round-robin win probabilities, P from a probability or a label, the logit."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from alignlab.algorithms.online_preference.common import (
    TIE,
    Labeller,
    logit,
    preference_value,
    round_robin,
)
from alignlab.cli.main import app
from alignlab.rewards.judges import RewardJudge, Verdict
from alignlab.rollout.role import Rollouts


def length_judge(temperature: float = 1.0) -> RewardJudge:
    """P(a ≻ b) = σ((|a| − |b|)/τ), |·| in characters."""
    return RewardJudge(lambda prompts, completions: [float(len(c)) for c in completions],
                       temperature)


class CountingJudge:
    """A judge with counters, as a label budget keeps them."""

    def __init__(self) -> None:
        self.inner, self.calls = length_judge(), 0

    def judge(self, prompts, a, b):
        self.calls += len(prompts)
        return self.inner.judge(prompts, a, b)

    def counters(self):
        return {"calls": self.calls}

    def load_counters(self, state):
        self.calls = state["calls"]


def test_labeller_counts_labels_and_makes_identical_pairs_free_ties():
    labeller = Labeller(length_judge())
    metrics: dict[str, float] = {}
    verdicts = labeller.verdicts(["p"] * 3, ["aa", "same", "a"], ["a", "same", "a b"], metrics)
    assert verdicts[0].a_preferred is True and verdicts[0].p_a == pytest.approx(
        1 / (1 + math.exp(-1)))
    assert verdicts[1] is TIE and TIE.p_a == 0.5
    assert verdicts[2].a_preferred is False
    assert metrics == {"labels": 2, "ties": 0, "labels_total": 2, "dropped_identical": 1}
    labeller.verdicts(["p"], ["x"], ["y"], metrics)  # equal lengths: a judged tie
    assert metrics["labels_total"] == 3 and metrics["ties"] == 1


def test_labeller_state_keeps_the_judges_counters():
    a = Labeller(CountingJudge())
    a.verdicts(["p"] * 2, ["a", "bb"], ["ccc", "d"])
    b = Labeller(CountingJudge())
    b.load_state_dict(a.state_dict())
    assert b.totals["labels"] == 2 and b.judge.calls == 2


def test_round_robin_is_the_mean_win_probability_against_the_prompts_samples():
    """Three samples of one prompt, lengths 1 < 2 < 3, a near-deterministic judge:
    P̂ = ((½ + 0 + 0)/3, (½ + 1 + 0)/3, (½ + 1 + 1)/3); a second prompt's samples are separate."""
    texts = ["a", "bb", "ccc", "dd", "e"]
    rollouts = Rollouts(prompts=["p"] * 3 + ["q"] * 2, completions=texts,
                        completion_ids=[[1]] * 5, finish_reasons=["eos"] * 5,
                        prompt_index=[0, 0, 0, 1, 1])
    metrics: dict[str, float] = {}
    win = round_robin(Labeller(length_judge(0.01)), rollouts, [[0, 1, 2], [3, 4]], "probability",
                      metrics)
    assert win == pytest.approx([1 / 6, 1 / 2, 5 / 6, 3 / 4, 1 / 4])
    assert metrics["labels"] == 3 + 1  # every pair of a prompt once


def test_preference_from_probability_or_label():
    v = Verdict(0.7, True)
    assert preference_value(v, "probability") == 0.7
    assert preference_value(v, "label") == 1.0
    assert preference_value(Verdict(0.4, False), "label") == 0.0
    assert preference_value(Verdict(0.5, None), "label") == 0.5


def test_logit_inverts_bradley_terry_and_stays_finite_on_labels():
    assert logit(1 / (1 + math.exp(-1.3))) == pytest.approx(1.3)
    assert logit(1.0) == pytest.approx(math.log(999)) and logit(0.0) == pytest.approx(-math.log(999))


NAMES = ["iterative_dpo", "xpo", "nash_md", "sppo", "p3o", "selm", "vpo", "inpo", "dno", "egpo"]


@pytest.mark.parametrize("name", NAMES)
def test_each_algorithm_is_registered_and_its_example_config_loads(name):
    from alignlab.algorithms.registry import ALGORITHMS
    from alignlab.core.config import load_config

    entry = ALGORITHMS.get(name)
    cfg = load_config(entry.config_cls, f"examples/{name}_world.yaml")
    assert getattr(cfg, name).judge.reward == "gold"
    assert cfg.train.output_dir == f"runs/{name}_world"


@pytest.mark.parametrize("name", NAMES)
def test_each_algorithm_trains_from_the_cli_with_its_example_config(tiny_world, world_cache,
                                                                     tmp_path, name):
    out = tmp_path / name
    result = CliRunner().invoke(app, [
        "train", name, "--config", f"examples/{name}_world.yaml",
        "--set", "world.preset=tiny", "--set", f"world.cache_dir={world_cache}",
        "--set", f"train.output_dir={out}", "--set", "train.max_steps=1",
        "--set", "train.progress=false", "--set", "train.tensorboard=false",
        "--set", "rollout.prompts_per_step=2", "--set", "rollout.max_new_tokens=8"])
    assert result.exit_code == 0, result.output
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1 and row["labels_total"] == row["labels"] > 0
    assert "kl_ref" in row and "win_rate_gold" in row
    assert (out / "final" / "model.safetensors").exists()
