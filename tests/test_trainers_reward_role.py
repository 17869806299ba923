"""The reward role: time limits (watchdog and sandboxed worker), reported metrics, per-token
rewards, and how per-token rewards reach the advantage estimators."""

from __future__ import annotations

import statistics
import sys
import time

import pytest
import torch

from alignlab.algorithms.policy_gradient import algorithm as pg_algorithm
from alignlab.algorithms.policy_gradient.algorithm import estimator_advantages
from alignlab.algorithms.policy_gradient.config import OnlineRLConfig, RLSection
from alignlab.algorithms.policy_gradient.run import build_reward, train_policy_gradient
from alignlab.algorithms.policy_gradient.spec import RL_ALGORITHMS
from alignlab.core.config import RolloutSection, TrainSection, WorldSection, load_config
from alignlab.core.errors import ConfigError, RewardError
from alignlab.losses.advantages import ADVANTAGE_ESTIMATORS, kl_shaped_rewards
from alignlab.rewards import RewardValues
from alignlab.rewards.scoring import RewardRole, resolve_reward, token_reward_tensor

PROMPTS, COMPLETIONS = ["p one", "p two"], ["a b", "c"]

USER = """
import threading, time
RELEASE = threading.Event()

def waits(prompts, completions, **fields):
    RELEASE.wait(30)
    return [1.0] * len(completions)

def sleepy(prompts, completions, **fields):
    time.sleep(30)

def quick(prompts, completions, **fields):
    return [2.0] * len(completions)
"""


@pytest.fixture
def user(tmp_path, monkeypatch):
    (tmp_path / "role_user_rewards.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "role_user_rewards", raising=False)  # a fresh RELEASE
    import role_user_rewards

    yield role_user_rewards
    role_user_rewards.RELEASE.set()


def test_in_process_timeout_stops_with_the_reward_the_limit_and_the_sample(user):
    role = RewardRole({"role_user_rewards:waits": (1.0, resolve_reward("role_user_rewards:waits"))},
                      timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"(?s)reward 'role_user_rewards:waits' timed out after "
                                          r"0.2 s.*rows \[0, 1\].*prompt: 'p one'"):
        role.score(PROMPTS, COMPLETIONS)
    assert time.monotonic() - t0 < 1.0


def test_in_process_timeout_skips_the_batch_then_refuses_to_pile_up_calls(user):
    role = RewardRole({"w": (1.0, user.waits), "q": (1.0, user.quick)}, on_error="skip",
                      timeout_s=0.2)
    with pytest.warns(UserWarning, match="skipping 2 sample"):
        out = role.score(PROMPTS, COMPLETIONS)
    assert out.valid == [False, False] and out.skipped == 2 and role.total_skipped == 2
    assert out.metrics == {"reward/w/timeout": 1.0}
    # The abandoned call is still running: a second one would only add another stuck thread.
    with pytest.raises(RewardError, match=r"still running.*rl.reward_sandbox"):
        role.score(PROMPTS, COMPLETIONS)
    user.RELEASE.set()
    time.sleep(0.05)
    assert role.score(PROMPTS, COMPLETIONS).scores == [3.0, 3.0]


def test_sandboxed_reward_is_killed_at_its_deadline_and_handled_by_the_policy(user):
    name = "role_user_rewards:sleepy"
    cfg = RLSection(reward={name: 1.0, "role_user_rewards:quick": 1.0}, on_reward_error="skip",
                    reward_timeout_s=0.5, reward_sandbox={name: {"memory_mb": 512}})
    role = build_reward(cfg, None)
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match=r"timed out after 0.5 s \(sandboxed worker killed\)"):
        out = role.score(PROMPTS, COMPLETIONS)
    assert time.monotonic() - t0 < 3.0
    assert out.skipped == 2 and out.metrics == {f"reward/{name}/timeout": 1.0}
    cfg.on_reward_error = "stop"
    with pytest.raises(RewardError, match=f"reward '{name}' timed out"):
        build_reward(cfg, None).score(PROMPTS, COMPLETIONS)


def test_reward_time_limit_settings_are_validated_naming_the_field(user):
    with pytest.raises(ConfigError, match="rl.reward_sandbox: \\['brevity'\\] are not rewards"):
        build_reward(RLSection(reward="gold", reward_sandbox={"brevity": {}}), None)
    with pytest.raises(ConfigError, match="rl.reward_sandbox: 'gold'"):
        build_reward(RLSection(reward="gold", reward_sandbox={"gold": {}}), None)
    with pytest.raises(ConfigError, match="field 'rl.reward_timeout_s'"):
        load_config(OnlineRLConfig, None, ["rl.reward_timeout_s=0"])
    with pytest.raises(ConfigError, match="field 'rl.reward_sandbox.x.memory_mb'"):
        load_config(OnlineRLConfig, None, ["rl.reward_sandbox={x: {memory_mb: -1}}"])
    with pytest.raises(ConfigError, match="rl.reward_timeout_s: got -1"):
        RewardRole({}, timeout_s=-1)


def test_metrics_a_reward_reports_are_prefixed_with_its_name():
    role = RewardRole({"m": (1.0, lambda p, c, **_: RewardValues([1.0] * len(c), {"hits": 2}))})
    assert role.score(PROMPTS, COMPLETIONS).metrics == {"reward/m/hits": 2.0}


# ---------------------------------------------------------------------------------- per token

def per_token_len(prompts, completions, *, completion_ids, **fields):
    """0.1 on every completion token."""
    return [[0.1] * len(ids) for ids in completion_ids]


per_token_len.per_token = True


def _dense(prompts, completions, *, completion_ids, **fields):
    return [[float(t) for t in ids] for ids in completion_ids]


_dense.per_token = True


def test_per_token_rewards_are_weighted_summed_into_scores_and_returned_per_token():
    role = RewardRole({"dense": (0.5, _dense), "flat": (1.0, lambda p, c, **_: [1.0, -1.0])})
    out = role.score(PROMPTS, COMPLETIONS, completion_ids=[[2, 4], [6]])
    assert out.token_rewards == [[1.0, 2.0], [3.0]]
    assert out.components["dense"] == [6.0, 6.0] and out.scores == [4.0, 2.0]
    assert RewardRole({"flat": (1.0, lambda p, c, **_: [1.0, 1.0])}).score(
        PROMPTS, COMPLETIONS).token_rewards is None


def test_per_token_contract_violations_name_the_reward_and_the_row():
    short = lambda p, c, *, completion_ids, **_: [[1.0] * len(completion_ids[0]), [1.0]]  # noqa: E731
    short.per_token = True
    with pytest.raises(RewardError, match=r"reward 'short' returned bad per-token rewards \(row 1: "
                                          r"1 token rewards for a completion of 3 tokens\)"):
        RewardRole({"short": (1.0, short)}).score(PROMPTS, COMPLETIONS, completion_ids=[[1], [1, 2, 3]])
    with pytest.raises(RewardError, match="'dense' is per-token .* no completion_ids"):
        RewardRole({"dense": (1.0, _dense)}).score(PROMPTS, COMPLETIONS)
    undeclared = RewardRole({"lists": (1.0, lambda p, c, **_: [[1.0], [2.0]])})
    with pytest.raises(RewardError, match="must set per_token = True"):
        undeclared.score(PROMPTS, COMPLETIONS)


def test_token_rewards_land_on_the_completion_tokens_not_the_prompt_or_the_eos():
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])  # row 0 ends with an eos the batch appended
    dense = token_reward_tensor([[1.0, 2.0], [3.0]], mask)
    assert dense.tolist() == [[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0]]
    with pytest.raises(RewardError, match="row 1: 2 token rewards but only 1"):
        token_reward_tensor([[1.0], [1.0, 2.0]], mask)


def compute_advantages(spec, cfg, exp, scores, group_ids, baseline, token_rewards=None):
    exp = {**exp, "scores": scores, "group_ids": group_ids}
    if baseline is not None:
        exp["baseline_scores"] = baseline
    if token_rewards is not None:
        exp["token_rewards"] = token_rewards
    return estimator_advantages(spec, cfg.rl, exp)


def _exp() -> dict[str, torch.Tensor]:
    # Row 0: one prompt token, two completion tokens, the eos. Row 1: three completion tokens.
    return {"loss_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])}


def test_reinforce_pp_gets_token_rewards_in_place_and_the_rest_of_the_score_on_the_last_token():
    exp = _exp()
    dense = token_reward_tensor([[1.0, 0.0], [0.0, 0.0, 2.0]], exp["loss_mask"])
    sequence_level = torch.tensor([1.0, -1.0])
    scores = sequence_level + dense.sum(-1)  # what RewardScores.scores holds: [2, 1]
    cfg = OnlineRLConfig(rl=RLSection())
    adv, _ = compute_advantages(RL_ALGORITHMS["reinforce_pp"], cfg, exp, scores,
                                torch.tensor([0, 1]), None, dense)
    # Rewards r_t: row 0 [1, 0, 1 (eos: the sequence-level 1)], row 1 [0, 0, 2 − 1].
    # Returns G_t = Σ_{s≥t} r_s: row 0 [2, 1, 1], row 1 [1, 1, 1]; REINFORCE++ whitens them.
    returns = [2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    mean, std = statistics.fmean(returns), statistics.stdev(returns)
    expected = [[0.0] + [(g - mean) / std for g in returns[:3]],
                [(g - mean) / std for g in returns[3:]] + [0.0]]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_sequence_estimators_see_the_summed_score_and_kl_shaping_keeps_the_token_rewards():
    exp = _exp()
    dense = token_reward_tensor([[1.0, 0.0], [0.0, 0.0, 2.0]], exp["loss_mask"])
    scores = torch.tensor([2.0, 1.0])
    cfg = OnlineRLConfig(rl=RLSection())
    with_dense, _ = compute_advantages(RL_ALGORITHMS["remax"], cfg, exp, scores,
                                       torch.tensor([0, 1]), torch.tensor([0.5, 0.5]), dense)
    without, _ = compute_advantages(RL_ALGORITHMS["remax"], cfg, exp, scores,
                                    torch.tensor([0, 1]), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(with_dense, without)
    assert with_dense[0, 1].item() == pytest.approx(1.5)

    g = torch.Generator().manual_seed(0)
    exp["old_logprobs"] = -torch.rand(2, 4, generator=g)
    exp["ref_logprobs"] = -torch.rand(2, 4, generator=g)
    cfg = OnlineRLConfig(rl=RLSection(kl_coef=0.1))
    adv, metrics = compute_advantages(RL_ALGORITHMS["reinforce_pp"], cfg, exp, scores,
                                      torch.tensor([0, 1]), None, dense)
    shaped, _ = kl_shaped_rewards(scores - dense.sum(-1), exp["old_logprobs"],
                                  exp["ref_logprobs"], exp["loss_mask"], 0.1, "k1")
    expected, _ = ADVANTAGE_ESTIMATORS.get("reinforce_pp")(mask=exp["loss_mask"],
                                                           rewards=shaped + dense)
    torch.testing.assert_close(adv, expected)
    assert metrics["kl_penalty"] != 0


def test_a_per_token_reward_reaches_the_estimator_in_a_training_run(world_cache, tmp_path,
                                                                     monkeypatch):
    seen = []
    real = pg_algorithm.estimator_advantages

    def spy(spec, rl, exp):
        seen.append((exp["loss_mask"].clone(), exp["scores"].clone(), exp.get("token_rewards")))
        return real(spec, rl, exp)

    monkeypatch.setattr(pg_algorithm, "estimator_advantages", spy)
    cfg = OnlineRLConfig(
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        train=TrainSection(output_dir=str(tmp_path), max_steps=1, batch_size=16, progress=False,
                           tensorboard=False),
        rollout=RolloutSection(prompts="world:positive", prompts_per_step=2, n=2,
                               max_new_tokens=8),
        rl=RLSection(reward="tests.test_trainers_reward_role:per_token_len"))
    run = train_policy_gradient(cfg, "reinforce_pp")
    (mask, scores, token_rewards), = seen
    # 0.1 on each sampled token (not the prompt, not the appended eos), summed into the score.
    assert (token_rewards[mask == 0] == 0).all()
    torch.testing.assert_close(token_rewards.sum(-1), scores)
    last = run.result.history[-1]
    assert float((token_rewards != 0).sum(-1).float().mean()) == last["response_length"]
    assert last["reward_mean"] == pytest.approx(0.1 * last["response_length"], rel=1e-5)


def test_a_setting_error_inside_a_reward_is_not_skipped_as_a_bad_sample():
    role = RewardRole({"python_output": (1.0, resolve_reward("python_output"))}, on_error="skip")
    with pytest.raises(ConfigError, match="reward 'python_output': .*'expected_output' column"):
        role.score(PROMPTS, ["print(1)", "print(2)"])
