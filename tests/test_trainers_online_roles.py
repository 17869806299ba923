"""The online-RL roles: reward errors and policies, user rewards, batches, exact aggregation."""

from __future__ import annotations

import copy
import math
import sys
import textwrap

import pytest
import torch

from alignlab.algorithms.policy_gradient.objective import PolicyObjective
from alignlab.core.config import TrainSection
from alignlab.core.errors import ConfigError, RewardError
from alignlab.engine.learner import Learner, rows_of
from alignlab.rewards.scoring import RewardRole, resolve_reward
from alignlab.rollout.role import RolloutRole, Rollouts

from conftest import random_llama

PROMPTS = ["p one", "p two", "p three"]
COMPLETIONS = ["good", "bad completion", "fine"]


def _raising(prompts, completions, **_):
    if any("bad" in c for c in completions):
        raise ValueError("cannot score this")
    return [1.0] * len(completions)


def _nan(prompts, completions, **_):
    return [float("nan") if "bad" in c else 2.0 for c in completions]


def test_raising_reward_stops_with_its_name_and_the_offending_sample():
    role = RewardRole({"my_scorer": (1.0, _raising)}, on_error="stop")
    with pytest.raises(RewardError) as err:
        role.score(PROMPTS, COMPLETIONS)
    msg = str(err.value)
    assert "my_scorer" in msg and "ValueError: cannot score this" in msg
    assert "'p two'" in msg and "'bad completion'" in msg and "rows [1]" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_non_finite_or_none_reward_stops_naming_the_reward(bad):
    role = RewardRole({"nanny": (1.0, lambda p, c, **_: [1.0, bad, 1.0])}, on_error="stop")
    with pytest.raises(RewardError, match=r"reward 'nanny' returned None/NaN/inf.*rows \[1\]"
                       r"(?s:.*)completion: 'bad completion'"):
        role.score(PROMPTS, COMPLETIONS)


def test_wrong_number_of_rewards_is_an_error():
    role = RewardRole({"short": (1.0, lambda p, c, **_: [1.0])})
    with pytest.raises(RewardError, match="'short' returned 1 values for 3 completions"):
        role.score(PROMPTS, COMPLETIONS)


def test_skip_policy_drops_only_offending_rows_and_counts_them():
    role = RewardRole({"r": (1.0, _raising), "n": (0.5, _nan)}, on_error="skip")
    with pytest.warns(UserWarning, match="skipping 1 sample"):
        out = role.score(PROMPTS, COMPLETIONS)
    assert out.valid == [True, False, True]
    assert out.scores[0] == out.scores[2] == 1.0 + 0.5 * 2.0 and math.isnan(out.scores[1])
    assert out.skipped == 1 and role.total_skipped == 1


def test_on_reward_error_names_the_field():
    with pytest.raises(ConfigError, match="rl.on_reward_error"):
        RewardRole({}, on_error="ignore")


def test_user_reward_module_function_is_loaded_and_called_batched_with_row_fields(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_rl.py").write_text(textwrap.dedent("""
        CALLS = []
        def matches(prompts, completions, answer, **fields):
            CALLS.append((list(prompts), list(completions), list(answer)))
            return [float(c == a) for c, a in zip(completions, answer)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve_reward("my_rewards_rl:matches")
    role = RewardRole({"my_rewards_rl:matches": (2.0, fn)})
    out = role.score(PROMPTS, COMPLETIONS, {"answer": ["good", "x", "fine"]})
    assert out.scores == [2.0, 0.0, 2.0]
    calls = sys.modules["my_rewards_rl"].CALLS
    assert calls == [(PROMPTS, COMPLETIONS, ["good", "x", "fine"])]  # one batched call


def test_unknown_rewards_name_the_field():
    with pytest.raises(ConfigError, match="rl.reward: cannot load user reward 'nope_mod:f'"):
        resolve_reward("nope_mod:f")
    with pytest.raises(ConfigError, match="rl.reward"):
        resolve_reward("no_such_reward_name")
    with pytest.raises(ConfigError, match="rl.reward: 'gold' needs prompts from a world task"):
        resolve_reward("gold", task=None)


def test_rollout_batch_masks_completion_and_the_eos_that_ended_it(tiny_world):
    tok = tiny_world.tokenizer()
    role = RolloutRole(None, tok, max_new_tokens=4)
    p = tok(["the soup was"], add_special_tokens=False)["input_ids"][0]
    r = Rollouts(["the soup was"] * 2, ["", ""], [[7, 8], [9, 10, 11, 12]], ["eos", "length"], [0, 0])
    b = role.to_batch(r)
    n = len(p)
    assert b["input_ids"][0, :n + 3].tolist() == p + [7, 8, tok.eos_token_id]
    assert b["loss_mask"][0].tolist() == [0] * n + [1, 1, 1] + [0]
    assert b["loss_mask"][1].tolist() == [0] * n + [1, 1, 1, 1]  # no eos: it hit the limit
    assert b["attention_mask"][0].tolist() == [1] * (n + 3) + [0]


def test_generate_trains_on_the_sampled_ids(tiny_world):
    """The batch holds the engine's own ids (prompt + sample + the eos that ended it), not a
    re-encoding of the decoded text."""
    tok = tiny_world.tokenizer()
    from transformers import AutoModelForCausalLM

    role = RolloutRole(AutoModelForCausalLM.from_pretrained(tiny_world.base_dir), tok, max_new_tokens=6)
    r = role.generate(["the soup was", "the staff"], 2, seed=0)
    b = role.to_batch(r)
    assert r.prompt_index == [0, 0, 1, 1] and r.prompts[2] == "the staff"
    for i in range(4):
        p = tok(r.prompts[i], add_special_tokens=False)["input_ids"]
        row = p + r.completion_ids[i] + ([tok.eos_token_id] if r.finish_reasons[i] == "eos" else [])
        assert b["input_ids"][i, :len(row)].tolist() == row
        assert int(b["loss_mask"][i].sum()) == len(row) - len(p)


def _experience(n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = 12
    ids = torch.randint(1, 64, (n, width), generator=g)
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    attn = (torch.arange(width)[None] < lengths[:, None]).long()
    loss_mask = attn.clone()
    loss_mask[:, :2] = 0
    return {"input_ids": ids, "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
            "loss_mask": loss_mask,
            "old_logprobs": -2.0 * loss_mask + 0.1 * torch.randn(n, width, generator=g) * loss_mask,
            "advantages": torch.randn(n, 1, generator=g).expand(n, width) * loss_mask}


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_update_is_the_same_for_one_minibatch_of_16_and_four_micro_batches_of_4(aggregation):
    exp = _experience()
    cfg = TrainSection(lr=1e-2, max_grad_norm=None, precision="fp32", device="cpu")
    params = []
    for micro in (16, 4):
        model = random_llama(seed=3)
        obj = PolicyObjective("ppo_clip", aggregation, max_tokens=12)
        role = Learner(model, obj, cfg, minibatch_size=16, micro_batch_size=micro)
        # Plain SGD: the update is −lr·gradient, so equal updates mean equal gradients (Adam's
        # first step is ≈ lr·sign(g), which amplifies rounding on near-zero gradients).
        role.optimizer = torch.optim.SGD(role.params, lr=1.0)
        metrics = role.update(rows_of(copy.deepcopy(exp)))
        assert metrics["optimizer_steps"] == 1
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    changed = (params[0] - torch.cat([p.flatten() for p in random_llama(seed=3).parameters()])).abs().max()
    assert changed > 1e-4
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)


def test_epochs_and_minibatches_give_one_optimizer_step_each():
    exp = _experience()
    role = Learner(random_llama(), PolicyObjective(), TrainSection(device="cpu"), epochs=2,
                      minibatch_size=8, micro_batch_size=4)
    assert role.update(rows_of(exp))["optimizer_steps"] == 4 and role.updates == 4
