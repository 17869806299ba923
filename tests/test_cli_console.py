"""What the console shows: one line per run start, the config in the run dir, each warning's
cause once, no transformers bars, a per-trainer ``--help``, and whole-sentence summaries."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import yaml

from alignlab.cli.main import main, registry_entries, trainer_help
from alignlab.core import notices
from alignlab.core.errors import AlignlabWarning


def test_train_prints_one_line_and_writes_the_config_to_the_run_dir(tiny_world, world_cache,
                                                                   tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "alignlab.cli", "train", "sft", "--set", "world.preset=tiny",
         "--set", f"world.cache_dir={world_cache}", "--set", f"train.output_dir={out}",
         "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "data.limit=8",
         "--set", "train.progress=false"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    for noise in ("Loading weights", "Writing model shards", "adam_betas", "Traceback"):
        assert noise not in console
    assert f"full config in {out / 'config.yaml'}" in console  # one line, however long
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 2 and saved["data"]["limit"] == 8
    assert saved["train"]["save_every"] == 200  # the default saves periodically ...
    assert (out / "checkpoints").is_dir()  # ... and at the last step, so the run can go on


def test_train_name_help_lists_that_trainers_sections_and_fields(capsys, monkeypatch):
    text = trainer_help(["train", "grpo", "--help"])
    for section in ("model:", "world:", "train:", "rollout:", "rl:"):
        assert f"\n{section}" in text
    assert "kl_coef: float" in text and "loss_aggregation:" in text
    assert "precision: 'auto' | 'fp32' | 'bf16' = 'auto'" in text
    assert "Micro-batch size (examples per forward pass)." in text  # a field's docstring
    assert "preference:" not in text
    dpo = trainer_help(["train", "dpo", "-h"])
    assert "\npreference:" in dpo and "\nrollout:" not in dpo
    assert trainer_help(["train", "--help"]) is None  # click's own help of `train`
    assert trainer_help(["list", "losses", "--help"]) is None
    monkeypatch.setattr(sys, "argv", ["alignlab", "train", "reward", "--help"])
    main()
    assert "\nreward:" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["alignlab", "train", "nope", "--help"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2 and "allowed values:" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["losses", "algorithms", "rewards", "tasks", "advantages", "kl",
                                  "formats"])
def test_list_summaries_are_whole_sentences(what):
    for name, summary in registry_entries(what):
        text = summary.split("] ", 1)[1]
        assert text and text[-1] in ".)", (name, summary)
        assert "_CHECKS" not in text and "  " not in text
    formats = dict(registry_entries("formats"))
    assert "fields: prompt, chosen, rejected; optional: margin, tie, group" in formats["preference"]


def test_warn_once_shows_a_cause_once_and_counts_the_rest(capsys):
    notices.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            notices.warn_once("length-limit", f"{i}: most completions were cut")
        notices.warn_once("reward-skip:gold", "skipping 1 sample")
    assert [str(w.message) for w in caught] == ["0: most completions were cut", "skipping 1 sample"]
    assert all(w.category is AlignlabWarning for w in caught)
    assert notices.repeated() == {"length-limit": 2}
    notices.reset()
    assert notices.repeated() == {}


def test_an_online_run_warns_about_the_length_limit_once(tiny_world, world_cache, tmp_path,
                                                         capsys):
    from alignlab.algorithms.policy_gradient.config import OnlineRLConfig
    from alignlab.algorithms.policy_gradient.run import train_policy_gradient
    from alignlab.core.config import load_config

    cfg = load_config(OnlineRLConfig, None, [
        "world.preset=tiny", f"world.cache_dir={world_cache}", f"train.output_dir={tmp_path}",
        "train.max_steps=3", "train.progress=false", "train.save_every=null",
        "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=2",
        "rl.reward=gold", "rl.dynamic_sampling=false"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_policy_gradient(cfg, "grpo")
    length = [w for w in caught if "max_new_tokens" in str(w.message)]
    assert len(length) == 1 and length[0].category is AlignlabWarning
    assert "warning 'length-limit' occurred 2 more time(s)" in capsys.readouterr().out
