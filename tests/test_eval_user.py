"""``alignlab eval --prompts --reward [--reference]`` on the tiny world: the report's numbers
against hand computations on the same samples."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from typer.testing import CliRunner

from alignlab.cli.evaluate import parse_reward_spec
from alignlab.cli.main import app
from alignlab.core.errors import ConfigError, DataError
from alignlab.eval.user import kl_to_reference
from alignlab.models.loading import load_model, load_tokenizer
from alignlab.rollout.sampling import sample

runner = CliRunner()

REWARD = '''
def words_plus_bonus(prompts, completions, bonus, **fields):
    return [len(c.split()) + b for c, b in zip(completions, bonus)]
'''


@pytest.fixture(scope="module")
def base(tiny_world):
    return load_model(str(tiny_world.base_dir)).eval(), load_tokenizer(str(tiny_world.base_dir))


def _eval(args: list[str], cache: str, out) -> dict:
    result = runner.invoke(app, ["eval", "--model", "world:base", *args, "--out", str(out),
                                 "--preset", "tiny", "--cache-dir", cache])
    assert result.exit_code == 0, result.output
    return json.loads((out / "eval.json").read_text())


def test_mean_reward_is_the_user_function_on_the_generated_texts(tiny_world, world_cache,
                                                                 tmp_path, base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reward.py").write_text(REWARD)
    prompts = tiny_world.task("positive").eval_prompts[:3]
    bonus = [0.0, 10.0, 100.0]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "bonus": b}) + "\n"
                                              for p, b in zip(prompts, bonus)))
    sampling = ["--samples-per-prompt", "2", "--max-new-tokens", "10", "--seed", "5"]
    report = _eval(["--prompts", "p.jsonl", "--reward", "./reward.py:words_plus_bonus",
                    *sampling], world_cache, tmp_path / "one")
    model, tok = base
    s = sample(model, tok, prompts, n=2, max_new_tokens=10, seed=5)
    by_hand = [len(c.split()) + b for c, b in zip(s.completions, [x for x in bonus for _ in "ab"])]
    m = report["metrics"]
    assert m["reward_mean"] == pytest.approx(statistics.fmean(by_hand))
    assert m["reward_std"] == pytest.approx(statistics.pstdev(by_hand))
    assert m["length_words"] == pytest.approx(statistics.fmean(len(c.split()) for c in s.completions))
    assert m["hit_length_limit"] == s.finish_reasons.count("length") / 6
    assert [e["completion"] for e in report["examples"]] == s.completions
    assert report["n_samples"] == 6 and report["prompts"] == "p.jsonl"
    assert "| reward_mean |" in (tmp_path / "one" / "eval.md").read_text()

    # A weighted sum of the user's function and a registered reward, per component too.
    report = _eval(["--prompts", "p.jsonl", "--reward", "./reward.py:words_plus_bonus=0.5",
                    "--reward", "brevity=2", "--reward-params", "{brevity: {max_words: 4}}",
                    *sampling], world_cache, tmp_path / "two")
    brevity = [1 - min(len(c.split()), 4) / 4 for c in s.completions]
    m = report["metrics"]
    assert m["reward/./reward.py:words_plus_bonus"] == pytest.approx(statistics.fmean(by_hand))
    assert m["reward/brevity"] == pytest.approx(statistics.fmean(brevity))
    assert m["reward_mean"] == pytest.approx(
        statistics.fmean(0.5 * a + 2 * b for a, b in zip(by_hand, brevity)))


def test_kl_to_itself_is_zero_and_gold_is_the_default_on_world_prompts(tiny_world, world_cache,
                                                                       tmp_path, base):
    report = _eval(["--prompts", "world:positive", "--n-prompts", "4", "--reference",
                    "world:base", "--max-new-tokens", "8"], world_cache, tmp_path)
    m = report["metrics"]
    assert m["kl_ref"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_ref_k3"] == pytest.approx(0.0, abs=1e-6)
    model, tok = base
    task = tiny_world.task("positive")
    s = sample(model, tok, task.eval_prompts[:4], max_new_tokens=8, seed=1234)
    assert m["reward_mean"] == pytest.approx(statistics.fmean(task.gold(s.prompts, s.completions)))
    assert "KL estimator" in (tmp_path / "eval.md").read_text()


def test_kl_estimate_is_the_sum_of_per_token_log_ratios(tiny_world, base):
    """k1 and k3 by hand, one unpadded sequence at a time, against the batched estimate."""
    model, tok = base
    reference = load_model(str(tiny_world.base_dir)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    prompts = tiny_world.task("positive").eval_prompts[:3]
    s = sample(model, tok, prompts, n=2, max_new_tokens=6, temperature=0.8, seed=0)
    k1, k3 = kl_to_reference(model, reference, tok, s.prompts, s, temperature=0.8, batch_size=4)
    for i, prompt in enumerate(s.prompts):
        p_ids = tok(prompt)["input_ids"]
        c_ids = s.completion_ids[i] + ([tok.eos_token_id] if s.finish_reasons[i] == "eos" else [])
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            lp, ref = (torch.log_softmax(m(ids).logits[0, :-1] / 0.8, -1)
                       .gather(-1, ids[0, 1:, None])[len(p_ids) - 1:, 0] for m in (model, reference))
        log_r = ref - lp
        assert k1[i] == pytest.approx(float((-log_r).sum()), abs=1e-4)
        assert k3[i] == pytest.approx(float((log_r.exp() - 1 - log_r).sum()), abs=1e-4)
    assert statistics.fmean(k3) > 0
    with pytest.raises(ConfigError, match="greedy"):
        kl_to_reference(model, reference, tok, s.prompts, s, temperature=0.0)


def test_bad_inputs_are_one_line_errors(tiny_world, world_cache, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": ["not", "messages"]}\n')

    def error(*args: str) -> Exception:
        result = runner.invoke(app, ["eval", *args, "--out", str(tmp_path / "o"),
                                     "--preset", "tiny", "--cache-dir", world_cache])
        assert result.exit_code != 0
        return result.exception

    exc = error("--prompts", str(bad), "--reward", "brevity")
    assert isinstance(exc, DataError) and str(exc).startswith(f"{bad}:2: field 'prompt'")
    bad.write_text('{"prompt": "a"}\n')
    assert "--reward" in str(error("--prompts", str(bad)))
    assert "--prompts" in str(error("--reward", "brevity"))
    assert "nope.py not found" in str(error("--prompts", str(bad), "--reward", "./nope.py:fn"))
    assert "\n" not in str(error("--prompts", str(bad), "--reward", "brevity",
                                 "--reward-params", "[1, 2]"))
    assert "greedy" in str(error("--prompts", str(bad), "--reward", "brevity", "--reference",
                                 "world:base", "--temperature", "0"))


def test_reward_spec_parsing():
    assert parse_reward_spec(["brevity"]) == "brevity"
    assert parse_reward_spec(["./r.py:fn"]) == "./r.py:fn"
    assert parse_reward_spec(["./r.py:fn=0.5", "brevity=2"]) == {"./r.py:fn": 0.5, "brevity": 2.0}
    assert parse_reward_spec(["a=b.py:fn"]) == "a=b.py:fn"
