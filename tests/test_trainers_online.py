"""The online-RL controller: every critic-free algorithm raises the gold reward on the tiny world."""

from __future__ import annotations

import json

import pytest

from alignlab.algorithms.policy_gradient.config import OnlineRLConfig, RLSection
from alignlab.algorithms.policy_gradient.run import train_policy_gradient
from alignlab.algorithms.registry import ALGORITHMS
from alignlab.core.config import EvalSection, RolloutSection, load_config
from alignlab.core.errors import ConfigError, RewardError, TrainingError
from alignlab.eval.evaluate import evaluate
from alignlab.models.loading import load_model, load_tokenizer

from tests.conftest import online_config

EVAL = EvalSection(task="positive", n_prompts=32, samples_per_prompt=2, seed=11)


def _cfg(world_cache, tmp_path, steps=10, **rl) -> OnlineRLConfig:
    return online_config(world_cache, tmp_path, RLSection(**rl), steps)


@pytest.fixture(scope="module")
def gold_before(tiny_world):
    base = load_model(str(tiny_world.base_dir))
    return evaluate(base, load_tokenizer(str(tiny_world.base_dir)), tiny_world.task("positive"),
                    EVAL)["metrics"]["gold_mean"]


# Seed 0, 10 iterations of 8 prompts x 4 samples, lr 5e-4: measured gains on the 32x2 eval
# samples were grpo +0.51, rloo +0.47, remax +0.14, reinforce_pp +0.28 (and +0.33 to +0.69 for
# all four with train seeds 1 and 2).
@pytest.mark.parametrize("algorithm,margin", [("grpo", 0.3), ("rloo", 0.3), ("remax", 0.1),
                                              ("reinforce_pp", 0.15)])
def test_algorithm_raises_gold_sentiment_on_positive(tiny_world, world_cache, tmp_path, gold_before,
                                                     algorithm, margin):
    run = train_policy_gradient(_cfg(world_cache, tmp_path), algorithm)
    after = evaluate(run.model, run.tokenizer, tiny_world.task("positive"), EVAL)["metrics"]["gold_mean"]
    assert after > gold_before + margin, (algorithm, gold_before, after)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    for key in ("reward_mean", "reward_std", "gold_mean", "response_length", "clip_fraction",
                "frac_hit_length_limit", "dropped_groups", "time_rollout", "time_reward",
                "time_batches", "time_update"):
        assert key in rows[-1], key
    assert (tmp_path / "final" / "alignlab_config.yaml").exists()


def test_grpo_variants_kl_loss_gspo_clip_higher_dynamic_sampling_run_and_log(
        world_cache, tmp_path):
    run = train_policy_gradient(_cfg(world_cache, tmp_path, steps=3, kl_coef=0.05, loss_aggregation="dr_grpo",
                          importance="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4,
                          dynamic_sampling=True, epochs=2, minibatch_size=16, entropy=True),
                     "grpo")
    last = run.result.history[-1]
    assert last["kl"] >= 0 and last["kl_ref"] > 0  # the policy has moved off the reference
    # make_batches ran the old and reference log-prob passes: their time is its own part
    assert last["time_batches"] > 0 and last["time_update"] > 0
    kept = 32 - 4 * last["dropped_groups"]
    assert last["optimizer_steps"] == 2 * -(-kept // 16)  # epochs x minibatches
    assert "seq_ratio_mean" in last and "entropy" in last


def test_dynamic_sampling_drops_zero_variance_groups_and_counts_them(world_cache, tmp_path):
    cfg = _cfg(world_cache, tmp_path, steps=2, reward="tests.test_trainers_online:constant_reward",
               dynamic_sampling=True)
    with pytest.raises(TrainingError, match="all 2 iterations were skipped"):
        train_policy_gradient(cfg, "grpo")  # every group dropped: nothing was ever learned
    history = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["dropped_groups"] for h in history] == [8, 8]
    assert history[-1]["dropped_groups_total"] == 16
    assert all(h.get("update_skipped") == 1 for h in history)


def constant_reward(prompts, completions, **_):
    return [1.0] * len(completions)


def test_config_errors_name_the_field(world_cache, tmp_path):
    entry = ALGORITHMS.get("grpo")
    yaml_file = tmp_path / "grpo.yaml"
    yaml_file.write_text("rl:\n  kl_coeff: 0.1\n")
    with pytest.raises(ConfigError, match=r"field 'rl.kl_coeff': unknown field; allowed fields: reward"):
        load_config(entry.config_cls, yaml_file)
    with pytest.raises(ConfigError, match=r"field 'rl.loss_aggregation'"):
        load_config(entry.config_cls, None, ["rl.loss_aggregation=mean"])
    with pytest.raises(ConfigError, match=r"train.grad_accum is not used by online RL"):
        load_config(entry.config_cls, None, ["train.grad_accum=4"])
    with pytest.raises(ConfigError, match=r"field 'rollout.n'"):
        load_config(entry.config_cls, None, ["rollout.n=0"])
    with pytest.raises(ConfigError, match="rollout.n: grpo compares the completions"):
        train_policy_gradient(_cfg(world_cache, tmp_path).model_copy(
            update={"rollout": RolloutSection(n=1)}), "grpo")
    with pytest.raises(ConfigError, match="rl.reward"):
        train_policy_gradient(_cfg(world_cache, tmp_path, reward="no_such_reward"), "rloo")


def test_every_rl_algorithm_is_registered_with_its_own_output_dir():
    reg = ALGORITHMS
    for name in ("grpo", "rloo", "remax", "reinforce_pp"):
        assert reg.get(name).config_cls().train.output_dir == f"runs/{name}"


def nan_on_first_reward(prompts, completions, **_):
    return [float("nan")] + [float(len(c.split())) for c in completions[1:]]


def test_skip_policy_in_the_loop_counts_skipped_samples_and_still_trains(world_cache, tmp_path):
    cfg = _cfg(world_cache, tmp_path, steps=2, on_reward_error="skip",
               reward="tests.test_trainers_online:nan_on_first_reward")
    with pytest.warns(UserWarning, match="nan_on_first_reward"):
        run = train_policy_gradient(cfg, "rloo")
    assert [h["reward_skipped"] for h in run.result.history] == [1, 1]
    assert all(h["optimizer_steps"] == 1 for h in run.result.history)
    cfg.rl.on_reward_error, cfg.train.overwrite = "stop", True
    with pytest.raises(RewardError, match="nan_on_first_reward"):
        train_policy_gradient(cfg, "rloo")


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(world_cache, tmp_path):
    import torch

    full = train_policy_gradient(_cfg(world_cache, tmp_path / "a", steps=4, kl_coef=0.1), "grpo").model
    cfg = _cfg(world_cache, tmp_path / "b", steps=2, kl_coef=0.1)
    cfg.train.save_every = 2
    train_policy_gradient(cfg, "grpo")
    cfg.train.max_steps, cfg.train.resume = 4, True
    resumed = train_policy_gradient(cfg, "grpo")
    assert resumed.result.history[0]["step"] == 3
    for (name, a), b in zip(full.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_cispo_with_a_rollout_correction_logs_the_sampler_mismatch(world_cache, tmp_path):
    from alignlab.algorithms.policy_gradient.config import RolloutCorrectionSection

    run = train_policy_gradient(_cfg(world_cache, tmp_path, steps=2, policy_loss="cispo",
                                     epochs=2, minibatch_size=16,
                                     rollout_correction=RolloutCorrectionSection(mode="mis",
                                                                                 low=0.5)),
                                "grpo")
    last = run.result.history[-1]
    # The built-in engine samples with the trained weights: the sampler's log-probs are the
    # trainer's up to kernel rounding, so nothing is masked.
    assert 0 <= last["rollout_is/abs_logp_diff_mean"] < 1e-2
    assert last["rollout_is/masked_fraction"] == 0.0
    assert last["rollout_is/weight_mean"] == pytest.approx(1.0, abs=1e-2)


def test_sapo_runs_and_rejects_the_ppo_clip_range(world_cache, tmp_path):
    run = train_policy_gradient(_cfg(world_cache, tmp_path, steps=1, policy_loss="sapo",
                                     policy_loss_kwargs={"tau_pos": 0.9}), "grpo")
    assert run.result.history[-1]["optimizer_steps"] == 1
    with pytest.raises(ConfigError, match="rl.policy_loss_kwargs"):
        train_policy_gradient(_cfg(world_cache, tmp_path / "bad", steps=1, policy_loss="sapo",
                                   policy_loss_kwargs={"clip_eps_low": 0.1}), "grpo")


SEEN_PROMPTS: list[str] = []


def remember_prompts(prompts, completions, **fields):
    SEEN_PROMPTS.extend(prompts)
    return [0.0 if i % 2 else 1.0 for i in range(len(completions))]


def test_conversational_prompts_go_through_the_chat_template(world_cache, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"write a review of the museum {i}"}]}
            for i in range(4)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(world_cache, tmp_path / "run", steps=1,
               reward="tests.test_trainers_online:remember_prompts")
    cfg.rollout.prompts, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = str(path), 2, 6
    import importlib

    seen = importlib.import_module("tests.test_trainers_online").SEEN_PROMPTS  # the reward's module
    seen.clear()
    train_policy_gradient(cfg, "grpo")
    assert seen and all(p.startswith("<|user|> write a review of the museum")
                        and p.rstrip().endswith("<|assistant|>") for p in seen), seen[:2]


@pytest.mark.parametrize("precision,sampled", [("bf16", "bf16"), ("auto", "fp32")])
def test_rollouts_sample_in_the_trainers_precision(world_cache, tmp_path, monkeypatch, precision,
                                                   sampled):
    """The built-in sampler runs in ``train.precision`` as resolved (the suite's ``auto`` is fp32,
    ``tests/conftest.py``), so its log-probs and the trainer's differ by kernels only."""
    from alignlab.rollout import backend

    seen, real = [], backend.rollout
    monkeypatch.setattr(backend, "rollout", lambda model, ids, params, **kw: (
        seen.append(params.precision), real(model, ids, params, **kw))[1])
    cfg = _cfg(world_cache, tmp_path, steps=1)
    cfg.train = cfg.train.model_copy(update={"precision": precision})
    train_policy_gradient(cfg, "grpo")
    assert seen == [sampled]


def test_the_online_loop_gives_free_heap_back_after_each_rollout_and_update(world_cache, tmp_path,
                                                                             monkeypatch):
    from alignlab.core import heap
    from alignlab.engine import controller

    assert heap.release_free_heap() is True  # Linux with glibc, as CI
    calls = []
    monkeypatch.setattr(controller, "release_free_heap", lambda: calls.append(1))
    train_policy_gradient(_cfg(world_cache, tmp_path, steps=2), "grpo")
    assert len(calls) == 4  # two iterations, each after its rollout and its update


