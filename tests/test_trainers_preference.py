"""The preference trainer: DPO, a reference-free, an unpaired and a listwise loss learn on the
tiny world; mixtures run; the objective sums per-example losses; config errors name fields."""

from __future__ import annotations

import pytest
import torch

from alignlab.algorithms.preference.heldout import implicit_reward_accuracy
from alignlab.algorithms.preference.trainer import (
    PreferenceConfig,
    PreferenceObjective,
    PreferenceSection,
    plan_losses,
    run_preference,
)
from alignlab.algorithms.registry import ALGORITHMS
from alignlab.core.config import DataSection, EvalSection, TrainSection, WorldSection, load_config
from alignlab.core.errors import ConfigError
from alignlab.data.preference_batches import add_kl_completions, collate_groups
from alignlab.eval.evaluate import evaluate
from alignlab.eval.preference_bench import sample_kl
from alignlab.losses.preference import PREFERENCE_LOSSES, PreferenceInputs

from tests.conftest import heldout_pairs, random_llama

EVAL = EvalSection(n_prompts=48, samples_per_prompt=2, seed=11)


def _cfg(world_cache, out, loss=None, losses=None, steps=40, lr=2e-4, **pref) -> PreferenceConfig:
    return PreferenceConfig(
        data=DataSection(source="world:positive", limit=512, max_length=96),
        train=TrainSection(output_dir=str(out), max_steps=steps, batch_size=8, lr=lr, warmup_steps=3,
                           log_every=5, progress=False, tensorboard=False),
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        preference=PreferenceSection(loss=loss or "dpo", losses=losses, **pref))


@pytest.fixture(scope="module")
def heldout(tiny_world):
    """Pairs on the task's *eval* prompts: chosen all-positive, rejected all-negative."""
    return heldout_pairs(tiny_world)


def test_dpo_raises_preference_and_gold_reward_with_bounded_kl(heldout, world_cache, tmp_path):
    task, tok, base, pairs = heldout
    assert implicit_reward_accuracy(base, base, pairs, tok.pad_token_id) == 0.0  # all ties
    before = evaluate(base, tok, task, EVAL)["metrics"]["gold_mean"]
    run = run_preference(_cfg(world_cache, tmp_path, "dpo", heldout=32))
    assert run.layout == "shared"  # prefix sharing is on by default for Llama
    assert run.heldout["rewards/accuracies"] >= 0.85 and len(run.examples) == 512 - 32
    assert implicit_reward_accuracy(run.model, base, pairs, tok.pad_token_id) >= 0.85
    after = evaluate(run.model, tok, task, EVAL)["metrics"]["gold_mean"]
    assert after > before + 0.25, (before, after)  # measured 0.11 -> 0.52
    kl = sample_kl(run.model, base, tok, task.eval_prompts[:48])
    assert 0.0 < kl < 15.0, kl  # measured 7.6 nats per sequence
    last = run.result.history[-1]
    assert last["rewards/accuracies"] > 0.8 and last["rewards/margins"] > 0


@pytest.mark.parametrize("loss,bound", [("simpo", 0.8), ("kto", 0.8), ("lipo_lambda", 0.8)])
def test_reference_free_unpaired_and_listwise_losses_learn(heldout, world_cache, tmp_path, loss, bound):
    """Measured held-out accuracies: simpo 0.92, kto 0.94, lipo_lambda 0.91 (chance: 0.5)."""
    _, tok, base, pairs = heldout
    run = run_preference(_cfg(world_cache, tmp_path, loss))
    assert implicit_reward_accuracy(run.model, base, pairs, tok.pad_token_id) >= bound
    if loss == "kto":
        assert "kl_ref" in run.result.history[-1]  # z0 came from the mismatched completions


@pytest.mark.parametrize("losses", [{"dpo": 1.0, "sft": 1.0}, {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}])
def test_mixtures_run(world_cache, tmp_path, losses):
    run = run_preference(_cfg(world_cache, tmp_path, losses=losses, steps=4))
    last = run.result.history[-1]
    assert all(f"{name}/loss" in last for name in losses)
    if "bco_pair" in losses:  # the trainer keeps BCO's running reward shift
        assert last["reward_shift"] != 0.0


def _batch(kind):
    g = torch.Generator().manual_seed(0)
    r = lambda k: torch.randint(1, 64, (k,), generator=g).tolist()  # noqa: E731
    if kind == "paired":
        ex = [{"prompt_ids": r(4 + i), "chosen_ids": r(3), "rejected_ids": r(2 + i)} for i in range(3)]
    else:
        ex = [{"prompt_ids": r(4 + i), "completion_ids": r(3 + i), "label": i != 1} for i in range(3)]
        add_kl_completions(ex, seed=0)
    for e in ex:
        e["ref_logps"] = [-20.0 - i for i in range(2)]
    return collate_groups(ex, 0)


def test_objective_returns_the_sum_of_per_pair_dpo_losses():
    model = random_llama(seed=5).float()
    batch = _batch("paired")
    obj = PreferenceObjective(plan_losses(PreferenceSection(loss="dpo", beta=0.5)))
    out = obj.loss(model, batch)
    assert obj.num_items(batch) == 3
    with torch.no_grad():
        from alignlab.models.logprobs import completion_logprobs
        lp, ref = completion_logprobs(model, batch), batch["ref_logps"]
    logits = 0.5 * ((lp[:3] - ref[:3]) - (lp[3:] - ref[3:]))
    assert out.loss_sum.item() == pytest.approx(-torch.nn.functional.logsigmoid(logits).sum().item(), abs=1e-5)


def test_kto_reference_point_is_the_mismatched_log_ratio_without_gradient():
    model = random_llama(seed=6).float()
    batch = _batch("unpaired")
    obj = PreferenceObjective(plan_losses(PreferenceSection(loss="kto")))
    out = obj.loss(model, batch)
    with torch.no_grad():
        from alignlab.models.logprobs import completion_logprobs
        lp, ref = completion_logprobs(model, batch), batch["ref_logps"]
    z0 = max(float((lp[3:] - ref[3:]).mean()), 0.0)
    assert out.metrics["kl_ref"] == pytest.approx(z0, abs=1e-5)
    expected = PREFERENCE_LOSSES.get("kto")(PreferenceInputs(
        logps=lp[:3], ref_logps=ref[:3], labels=batch["labels"], kl_ref=z0)).losses.sum()
    assert out.loss_sum.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("section,fields", [
    (dict(loss="dpoo"), ["preference.loss", "dpo"]),
    (dict(loss="dpo", loss_kwargs={"gama": 1}), ["preference.loss_kwargs.gama", "label_smoothing"]),
    (dict(losses={"dpo": 1, "kto": 1}), ["preference.losses", "unpaired"]),
    (dict(loss="pro", beta=0.2), ["preference.beta"]),
    (dict(losses={"dpo": 1}, per_loss={"sft": {}}), ["preference.per_loss.sft"]),
])
def test_config_errors_name_the_field(section, fields):
    with pytest.raises(ConfigError) as err:
        plan_losses(PreferenceSection(**section))
    assert all(f in str(err.value) for f in fields), str(err.value)


def test_ipo_length_normalize_reaches_the_ipo_loss_only():
    plan = plan_losses(PreferenceSection(loss="ipo", ipo_length_normalize=True))
    assert plan.per_loss == {"ipo": {"length_normalize": True}}
    assert plan_losses(PreferenceSection(loss="ipo")).per_loss == {}
    with pytest.raises(ConfigError, match="preference.ipo_length_normalize"):
        plan_losses(PreferenceSection(loss="dpo", ipo_length_normalize=True))


def test_data_format_must_match_the_loss_kind(world_cache, tmp_path):
    cfg = _cfg(world_cache, tmp_path, "kto")
    cfg.data.format = "preference"
    with pytest.raises(ConfigError, match=r"preference\.loss.*data\.format"):
        run_preference(cfg)


def test_aliases_set_the_loss_and_read_yaml(tmp_path):
    registry = ALGORITHMS
    for name in ("preference", "dpo", "ipo", "simpo", "orpo", "kto"):
        assert name in registry.names()
    assert registry.get("kto").config_cls().preference.loss == "kto"
    path = tmp_path / "x.yaml"
    path.write_text("preference:\n  beta: 0.2\n  loss_kwargs: {label_smoothing: 0.1}\n")
    cfg = load_config(registry.get("dpo").config_cls, path, ["train.max_steps=3"])
    assert (cfg.preference.loss, cfg.preference.beta, cfg.train.max_steps) == ("dpo", 0.2, 3)
    with pytest.raises(ConfigError, match="preference.refrence"):
        load_config(registry.get("dpo").config_cls, None, ["preference.refrence=x"])
