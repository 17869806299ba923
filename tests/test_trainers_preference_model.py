"""``alignlab train preference_model``: it learns on the tiny world (held-out agreement with
gold), from the command line too; ties, packing and resume; config errors name the field; and
an online algorithm runs with ``judge.kind: preference_model``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from alignlab.algorithms.online_preference.judge_config import (
    JudgeSection,
    PreferenceModelJudgeSection,
    make_judge,
)
from alignlab.algorithms.preference_model.trainer import (
    PreferenceModelConfig,
    PreferenceModelObjective,
    PreferenceModelSection,
    collate_pairs,
    load_pair_examples,
    pair_format,
    run_preference_model,
)
from alignlab.algorithms.reward_model.trainer import contrast_pairs
from alignlab.cli.main import app
from alignlab.core.config import (
    DataSection,
    LoraSettings,
    TrainSection,
    WorldSection,
    load_config,
)
from alignlab.core.errors import ConfigError
from alignlab.models.loading import load_tokenizer
from alignlab.rewards.judges import BudgetedJudge, PreferenceModelJudge
from alignlab.rewards.preference_model import PairEncoder, PairwisePreferenceModel

from tests.online_preference_helpers import config, metrics_rows


def _cfg(world_cache, out, *, source="world:positive", limit=320, steps=50, lr=3e-3, data=None,
         **section) -> PreferenceModelConfig:
    return PreferenceModelConfig(
        data=DataSection(source=str(source), limit=limit, **(data or {})),
        train=TrainSection(output_dir=str(out), max_steps=steps, batch_size=16, lr=lr,
                           warmup_steps=5, log_every=5, progress=False, tensorboard=False),
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        preference_model=PreferenceModelSection(eval_fraction=0.2, **section))


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def trained(tiny_world, world_cache, tmp_path_factory):
    """50 steps on the world's oracle pairs (seed 0), evaluated every 25."""
    out = tmp_path_factory.mktemp("pm")
    return run_preference_model(_cfg(world_cache, out, eval_every=25)), out


# Seed 0, 50 steps of 16 pairs (both orders) at lr 3e-3 on 256 of the world's oracle pairs
# (all-positive vs all-negative completions, ordered by gold): held-out (64 pairs) agreement
# with gold 0.95 after 25 steps, 0.94 after 50 (untrained: 0.48); 0.94 on 64 fresh pairs
# through the saved model's judge; log-loss 0.26, swap agreement 0.75.
def test_the_preference_model_learns_held_out_agreement_with_gold(trained, tiny_world):
    run, out = trained
    assert run.metrics["accuracy"] >= 0.8, run.metrics
    assert run.metrics["pairs"] == 64 and run.metrics["ties"] == 0
    assert run.metrics["p_chosen_mean"] > 0.6 and run.metrics["log_loss"] < 0.6
    assert 0 <= run.metrics["swap_agreement"] <= 1 and abs(run.metrics["position_bias"]) < 0.5
    logged = [json.loads(line) for line in (out / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [25, 50, 50] and logged[-1]["final"] == 1
    assert logged[-1]["accuracy"] == run.metrics["accuracy"] and logged[0]["accuracy"] > 0.7
    saved = json.loads((out / "preference_model_eval.json").read_text())
    assert saved == {"eval_examples": 64, "metrics": run.metrics}
    train_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert train_rows[-1]["accuracy"] > train_rows[0]["accuracy"]
    for name in ("model.safetensors", "preference_model.json", "tokenizer.json",
                 "alignlab_config.yaml"):
        assert (out / "final" / name).exists(), name
    assert (out / "DONE").exists()
    # the judge from the saved folder agrees with the run's own evaluation on fresh pairs
    task = tiny_world.task("positive")
    fresh = contrast_pairs(task, 64, seed=7)
    judge = PreferenceModelJudge.from_pretrained(out / "final")
    verdicts = judge.judge([r["prompt"] for r in fresh], [r["chosen"] for r in fresh],
                           [r["rejected"] for r in fresh])
    assert sum(v.a_preferred is True for v in verdicts) / len(fresh) >= 0.8


def test_an_untrained_model_is_at_chance(tiny_world, world_cache, tmp_path):
    from alignlab.algorithms.preference_model.evaluate import evaluate_preference_model
    from alignlab.algorithms.preference_model.trainer import init_model

    cfg = _cfg(world_cache, tmp_path)
    path = str(tiny_world.base_dir)
    tok = load_tokenizer(path)
    examples, pad = load_pair_examples(cfg, tok, PairEncoder(tok, pair_format(cfg)))
    metrics = evaluate_preference_model(init_model(path, cfg, pair_format(cfg)), examples[:64],
                                        pad)
    # measured: accuracy 0.50, log-loss 0.693; the fresh head says σ(s) ≈ 0.1 whatever the pair,
    # so the second-shown response wins in both orders (position bias −0.41, no swap agreement)
    # and the swap average cancels it: P(chosen ≻ rejected) 0.500
    assert abs(metrics["accuracy"] - 0.5) < 0.25, metrics
    assert metrics["log_loss"] == pytest.approx(0.693, abs=0.05)
    assert metrics["swap_agreement"] == 0 and metrics["position_bias"] < -0.3
    assert metrics["p_chosen_mean"] == pytest.approx(0.5, abs=0.01)


class FixedLogits(PairwisePreferenceModel):
    """A preference model whose logits are given, in sequence order."""

    def __init__(self, values: list[float]) -> None:
        torch.nn.Module.__init__(self)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.values = values

    def logits(self, batch):
        return torch.tensor(self.values[:batch["input_ids"].shape[0]]) + 0 * self.weight


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def seq(*ids: int) -> dict[str, list[int]]:
    return {"input_ids": list(ids), "loss_mask": [0] + [1] * (len(ids) - 1)}


def test_objective_loss_and_metrics_by_hand():
    examples = [{"ab": seq(3, 4), "ba": seq(3, 5), "target": 1.0},
                {"ab": seq(6, 7, 8), "ba": seq(6, 8, 7), "target": 0.5}]
    batch = collate_pairs(examples, 0)  # ab of both, then ba of both: targets 1, ½, 0, ½
    logits = [2.0, 1.0, -1.0, 3.0]
    out = PreferenceModelObjective().loss(FixedLogits(logits), batch)
    p = [sigmoid(x) for x in logits]
    bce = [-math.log(p[0]), -(math.log(p[1]) + math.log(1 - p[1])) / 2, -math.log(1 - p[2]),
           -(math.log(p[3]) + math.log(1 - p[3])) / 2]
    assert out.loss_sum.item() == pytest.approx(sum(bce), abs=1e-5)
    assert PreferenceModelObjective().num_items(batch) == 4
    assert out.metrics["accuracy"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert out.metrics["position_bias"] == pytest.approx(
        ((p[0] + p[2]) / 2 + (p[1] + p[3]) / 2) / 2 - 0.5, abs=1e-6)
    assert out.metrics["p_chosen_mean"] == pytest.approx(
        ((p[0] + 1 - p[2]) / 2 + (p[1] + 1 - p[3]) / 2) / 2, abs=1e-6)


def test_held_out_metrics_by_hand():
    from alignlab.algorithms.preference_model.evaluate import evaluate_preference_model

    examples = [{"ab": seq(3, 4), "ba": seq(3, 5), "target": 1.0},   # right: s 2, −1
                {"ab": seq(3, 6), "ba": seq(3, 7), "target": 1.0},   # wrong: s −1, 1
                {"ab": seq(3, 8), "ba": seq(3, 9), "target": 0.5}]   # a tie: s 1, 0
    logits = [2.0, -1.0, -1.0, 1.0, 1.0, 0.0]  # the judge's order: ab, ba of each pair
    m = evaluate_preference_model(FixedLogits(logits), examples, 0)
    p = [sigmoid(x) for x in logits]
    avg = [(p[0] + 1 - p[1]) / 2, (p[2] + 1 - p[3]) / 2, (p[4] + 1 - p[5]) / 2]
    assert (m["pairs"], m["ties"], m["accuracy"]) == (2, 1, 0.5)
    assert m["log_loss"] == pytest.approx(-(math.log(avg[0]) + math.log(avg[1])) / 2, abs=1e-6)
    assert m["p_chosen_mean"] == pytest.approx((avg[0] + avg[1]) / 2, abs=1e-6)
    assert m["swap_agreement"] == pytest.approx(2 / 3)  # the tie's two orders disagree
    assert m["position_bias"] == pytest.approx(
        sum((p[2 * i] + p[2 * i + 1]) / 2 - 0.5 for i in range(3)) / 3, abs=1e-6)
    assert m["tie_abs_error"] == pytest.approx(abs(avg[2] - 0.5), abs=1e-6)


# Seed 0: 600 oracle pairs relabelled by the simulated annotator (flip rate 0.2: 77% of the
# labels agree with gold), 300 steps at lr 3e-3: agreement with gold on 200 fresh oracle pairs
# 0.825 (the held-out noisy labels: 0.62; log-loss rose after step 100, it overfits them).
@pytest.mark.slow
def test_learns_gold_from_the_simulated_annotators_noisy_labels(tiny_world, world_cache,
                                                                tmp_path):
    from alignlab.rewards.annotator import SimulatedAnnotator

    task = tiny_world.task("positive")
    pairs = contrast_pairs(task, 600, seed=0)
    labels = SimulatedAnnotator.for_task(task, flip_rate=0.2, seed=0).label_pairs(
        [r["prompt"] for r in pairs], [r["chosen"] for r in pairs], [r["rejected"] for r in pairs])
    rows = [{"prompt": r["prompt"], **({"chosen": r["chosen"], "rejected": r["rejected"]}
                                        if lab.a_preferred is not False else
                                        {"chosen": r["rejected"], "rejected": r["chosen"]})}
            for r, lab in zip(pairs, labels)]
    source = _jsonl(tmp_path / "annotated.jsonl", rows)
    run = run_preference_model(_cfg(world_cache, tmp_path / "run", source=source, limit=None,
                                    steps=300))
    fresh = contrast_pairs(task, 200, seed=7)
    verdicts = PreferenceModelJudge(run.model, run.tokenizer).judge(
        [r["prompt"] for r in fresh], [r["chosen"] for r in fresh], [r["rejected"] for r in fresh])
    assert sum(v.a_preferred is True for v in verdicts) / len(fresh) >= 0.7


def test_train_preference_model_from_the_cli(tiny_world, world_cache, tmp_path):
    out = tmp_path / "pm"
    result = CliRunner().invoke(app, [
        "train", "preference_model", "--config", "examples/preference_model_world.yaml",
        "--set", "world.preset=tiny",
        "--set", f"world.cache_dir={world_cache}", "--set", f"train.output_dir={out}",
        "--set", "train.max_steps=2", "--set", "data.limit=40", "--set", "train.progress=false",
        "--set", "train.tensorboard=false", "--set", "preference_model.a_marker=' first:'",
        "--set", "preference_model.b_marker=' second:'"])
    assert result.exit_code == 0, result.output
    assert "40 pairs kept" in result.output
    fmt = json.loads((out / "final" / "preference_model.json").read_text())
    assert (fmt["a_marker"], fmt["b_marker"], fmt["max_length"]) == (" first:", " second:", 256)
    result = CliRunner().invoke(app, ["list", "algorithms"])
    assert "preference_model" in result.output.split()


def test_ties_are_half_in_both_orders_or_skipped(tiny_world, world_cache, tmp_path):
    rows = [{"prompt": "the food was", "chosen": " great .", "rejected": " bad ."},
            {"prompt": "the food was", "chosen": " fine .", "rejected": " okay .", "tie": True},
            {"prompt": "the staff", "chosen": " kind .", "rejected": " rude ."}]
    source = _jsonl(tmp_path / "ties.jsonl", rows)
    tok = load_tokenizer(str(tiny_world.base_dir))
    for ties, targets in (("half", [1.0, 0.5, 1.0, 0.0, 0.5, 0.0]), ("skip", [1.0, 1.0, 0.0, 0.0])):
        cfg = _cfg(world_cache, tmp_path, source=source, limit=None, ties=ties)
        examples, pad = load_pair_examples(cfg, tok, PairEncoder(tok, pair_format(cfg)))
        batch = collate_pairs(examples, pad)
        assert batch["target"].tolist() == targets
        assert batch["input_ids"].shape[0] == len(targets)


def test_over_long_pairs_are_cut_or_dropped(tiny_world, world_cache, tmp_path, capsys):
    tok = load_tokenizer(str(tiny_world.base_dir))
    cut = _cfg(world_cache, tmp_path, limit=8, data={"max_length": 24})
    examples, _ = load_pair_examples(cut, tok, PairEncoder(tok, pair_format(cut)))
    assert len(examples) == 8 and all(len(e["ab"]["input_ids"]) <= 24 for e in examples)
    assert "8 pairs kept (8 cut to data.max_length 24" in capsys.readouterr().out
    dropped = _cfg(world_cache, tmp_path, limit=8, data={"max_length": 24, "truncation": "drop"})
    with pytest.raises(ConfigError, match="0 pairs left after data.truncation 'drop'"):
        load_pair_examples(dropped, tok, PairEncoder(tok, pair_format(dropped)))
    assert pair_format(dropped).truncation == "keep_end_of_prompt"  # what the judge will cut


def test_packed_batches_give_the_padded_loss(tiny_world, world_cache, tmp_path):
    cfg = _cfg(world_cache, tmp_path, limit=6)
    tok = load_tokenizer(str(tiny_world.base_dir))
    examples, pad = load_pair_examples(cfg, tok, PairEncoder(tok, pair_format(cfg)))
    model = PairwisePreferenceModel.from_causal_lm(str(tiny_world.base_dir), pair_format(cfg))
    objective = PreferenceModelObjective()
    padded = objective.loss(model, collate_pairs(examples, pad))
    packed_batch = collate_pairs(examples, pad, packed=True)
    assert packed_batch["input_ids"].shape[0] == 1
    packed = objective.loss(model, packed_batch)
    assert packed.loss_sum.item() == pytest.approx(padded.loss_sum.item(), abs=1e-4)
    assert objective.num_items(packed_batch) == 12


def test_resume_continues_to_the_same_weights(tiny_world, world_cache, tmp_path):
    def cfg(out, steps, resume=False):
        c = _cfg(world_cache, out, limit=64, steps=steps)
        # a schedule that does not depend on max_steps, so 2 steps of a 2-step run are 2 of 4
        c.train.lr_scheduler, c.train.warmup_steps = "constant", 0
        c.train.save_every, c.train.resume, c.train.log_every = 2, resume, 1
        return c

    full = run_preference_model(cfg(tmp_path / "a", 4))
    run_preference_model(cfg(tmp_path / "b", 2))
    (tmp_path / "b" / "DONE").unlink()
    resumed = run_preference_model(cfg(tmp_path / "b", 4, resume=True))
    assert [r["step"] for r in resumed.result.history] == [3, 4]
    assert resumed.metrics == full.metrics
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("overrides,expected", [
    (["preference_model.a_marker=' X:'", "preference_model.b_marker=' X:'"],
     r"preference_model.a_marker and preference_model.b_marker must differ"),
    (["preference_model.a_marker=''"], r"field 'preference_model.a_marker'"),
    (["preference_model.ties=average"], r"field 'preference_model.ties': got 'average'; allowed "
                                        r"values: 'half' or 'skip'"),
    (["preference_model.eval_fraction=1"], r"field 'preference_model.eval_fraction'"),
])
def test_bad_settings_name_the_field(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(PreferenceModelConfig, overrides=overrides)


def test_rows_that_are_not_pairs_and_qlora_are_refused(tiny_world, world_cache, tmp_path):
    source = _jsonl(tmp_path / "scored.jsonl", [{"prompt": "p", "completion": "c", "score": 1.0},
                                                {"prompt": "q", "completion": "d", "score": 0.0}])
    with pytest.raises(ConfigError, match="rows have format 'prompt_completion'; a preference "
                                          "model learns from 'preference' rows"):
        run_preference_model(_cfg(world_cache, tmp_path / "a", source=source, limit=None))
    cfg = _cfg(world_cache, tmp_path / "b")
    cfg.model.lora = LoraSettings(r=4, quantize="4bit")  # LoRA runs (test_trainers_lora.py)
    with pytest.raises(ConfigError, match="model.lora.quantize"):
        run_preference_model(cfg)


def test_continuing_from_a_saved_model_needs_its_markers(trained, world_cache, tmp_path):
    _, out = trained
    cfg = _cfg(world_cache, tmp_path / "c", steps=1, a_marker="\nA:", b_marker="\nB:")
    cfg.model.name_or_path = str(out / "final")
    with pytest.raises(ConfigError, match=r"is a preference model with markers '\\n\[A\]'"):
        run_preference_model(cfg)


# ---- as the judge of online preference learning --------------------------------------------------

def test_make_judge_builds_the_preference_model_judge(trained, tiny_world, tmp_path):
    _, out = trained
    task, world = tiny_world.task("positive"), WorldSection()
    judge = make_judge(JudgeSection(kind="preference_model", max_labels=5,
                                    cache=str(tmp_path / "v.jsonl"),
                                    preference_model=PreferenceModelJudgeSection(
                                        path=str(out / "final"), debias=False, batch_size=3)),
                       task, 0, world=world)
    assert isinstance(judge, BudgetedJudge) and isinstance(judge.inner, PreferenceModelJudge)
    assert judge.max_labels == 5 and not judge.inner.debias and judge.inner.batch_size == 3
    judge.judge(["the food was"], [" great ."], [" bad ."])
    assert (tmp_path / "v.jsonl").exists()
    with pytest.raises(ConfigError, match=r"field 'online_dpo.judge.preference_model.path': "
                                          r"required by online_dpo.judge.kind=preference_model"):
        make_judge(JudgeSection(kind="preference_model"), task, 0, world=world)
    with pytest.raises(ConfigError, match=r"'online_dpo.judge.preference_model.path': .* is not "
                                          r"a preference model folder"):
        make_judge(JudgeSection(kind="preference_model", preference_model=PreferenceModelJudgeSection(
            path=str(tiny_world.base_dir))), task, 0, world=world)
    with pytest.raises(ConfigError, match=r"field 'online_dpo.judge.temperature': not used by "
                                          r"online_dpo.judge.kind=preference_model"):
        make_judge(JudgeSection(kind="preference_model", temperature=0.5), task, 0, world=world)
    with pytest.raises(ConfigError, match=r"'online_dpo.judge.preference_model': not used by "
                                          r"online_dpo.judge.kind=reward"):
        make_judge(JudgeSection(preference_model=PreferenceModelJudgeSection(path="x")), task, 0,
                   world=world)


def test_sppo_runs_with_the_preference_model_as_its_judge(trained, world_cache, tmp_path):
    from alignlab.algorithms.online_preference.sppo import train_sppo

    _, out = trained
    judge = JudgeSection(kind="preference_model",
                         preference_model=PreferenceModelJudgeSection(path=str(out / "final")))
    run = train_sppo(config("sppo", world_cache, tmp_path, steps=2, prompts=4, n=3,
                            max_new_tokens=12, win_rate_every=1, judge=judge))
    rows = metrics_rows(tmp_path)
    assert len(rows) == 2
    for row in rows:
        assert row["labels"] + row["dropped_identical"] == 4 * 3  # every pair of 3 samples
        assert 0 <= row["win_rate_judge"] <= 1 and "win_rate_gold" in row
        assert row["samples"] == 12
    assert (tmp_path / "final" / "model.safetensors").exists() and run.model is not None
