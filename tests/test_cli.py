"""The ``alignlab`` command as a user types it."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from alignlab.cli.main import app, registry_entries

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("world", "train", "eval", "list", "demo", "data"):
        assert cmd in result.output


def test_list_prints_one_name_a_line():
    result = runner.invoke(app, ["list", "losses"])
    names = result.output.split()
    assert result.exit_code == 0 and {"dpo", "simpo", "kto", "ppo_clip", "sft"} <= set(names)
    assert len(names) == len(set(names)) >= 25
    assert "sft" in runner.invoke(app, ["list", "algorithms"]).output.split()
    assert {"positive", "arithmetic", "positive_short"} <= set(runner.invoke(app, ["list", "tasks"]).output.split())
    assert "vader_sentiment" in runner.invoke(app, ["list", "rewards"]).output.split()
    assert all(summary for _, summary in registry_entries("losses"))


def test_train_sft_end_to_end_and_eval(tiny_world, world_cache, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"world: {{preset: tiny, cache_dir: {world_cache}}}\n"
                   f"train: {{output_dir: {out}, max_steps: 3, batch_size: 4, progress: false}}\n")
    result = runner.invoke(app, ["train", "sft", "--config", str(cfg), "--set", "data.limit=32"])
    assert result.exit_code == 0, result.output
    assert (out / "final" / "model.safetensors").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 1

    ev = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--model", str(out / "final"), "--task", "arithmetic",
                                 "--n-prompts", "8", "--out", str(ev), "--preset", "tiny",
                                 "--cache-dir", world_cache])
    assert result.exit_code == 0, result.output
    report = json.loads((ev / "eval.json").read_text())
    assert {"gold_mean", "ppl_heldout", "distinct_2", "length_tokens"} <= report["metrics"].keys()
    assert "| gold_mean |" in (ev / "eval.md").read_text()


def test_bad_config_is_rejected_by_field_without_traceback(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  precision: fp8\n")
    proc = subprocess.run([sys.executable, "-m", "alignlab.cli", "train", "sft", "--config", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.precision" in proc.stderr and "'bf16'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "alignlab.cli", "train", "ppo_nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "allowed values:" in proc.stderr and "sft" in proc.stderr


def test_train_online_dpo_from_the_cli(tiny_world, world_cache, tmp_path):
    out = tmp_path / "odpo"
    result = runner.invoke(app, [
        "train", "online_dpo", "--config", "examples/online_dpo_world.yaml",
        "--set", "world.preset=tiny", "--set", f"world.cache_dir={world_cache}",
        "--set", f"train.output_dir={out}", "--set", "train.max_steps=1",
        "--set", "train.progress=false", "--set", "rollout.prompts_per_step=2",
        "--set", "rollout.max_new_tokens=8", "--set", "online_dpo.judge.kind=annotator"])
    assert result.exit_code == 0, result.output
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1 and row["pairs"] + row["ties"] + row["dropped_identical"] == 4
    assert (out / "final" / "model.safetensors").exists()
