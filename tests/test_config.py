"""Configs: YAML + --set overrides; errors name the field and the allowed values."""

from __future__ import annotations

import pytest

from alignlab.algorithms.sft import SFTConfig
from alignlab.core.config import apply_overrides, load_config
from alignlab.core.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  max_steps: 5\ndata:\n  packing: true\n")
    cfg = load_config(SFTConfig, path, ["train.lr=3e-4", "model.lora.r=4", "world.preset=tiny"])
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 5 and cfg.data.packing
    assert cfg.model.lora.r == 4 and cfg.world.preset == "tiny"


def test_literal_error_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["train.lr_scheduler=exponential"])
    msg = str(err.value)
    assert "train.lr_scheduler" in msg and "'constant'" in msg and "'cosine'" in msg


def test_gradient_checkpointing_takes_true_false_or_selective(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  gradient_checkpointing: true\n")
    assert load_config(SFTConfig, path).train.gradient_checkpointing is True
    for given, expected in (("selective", "selective"), ("false", False), ("True", True)):
        cfg = load_config(SFTConfig, None, [f"train.gradient_checkpointing={given}"])
        assert cfg.train.gradient_checkpointing == expected
    with pytest.raises(ConfigError) as err:  # one message naming the field and the values
        load_config(SFTConfig, None, ["train.gradient_checkpointing=some"])
    msg = str(err.value)
    assert msg.count("train.gradient_checkpointing") == 1 and "true, false, 'selective'" in msg


def test_unknown_field_lists_allowed_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    msg = str(err.value)
    assert str(path) in msg and "train.learning_rate" in msg and "lr" in msg and "max_steps" in msg


def test_bad_type_and_range_name_the_field():
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(SFTConfig, None, ["train.max_steps=-3"])
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(SFTConfig, None, ["train.lr=fast"])


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n bad: [\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: not valid YAML"):
        load_config(SFTConfig, path)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"train": 3}, ["train.lr=1"])
    with pytest.raises(ConfigError, match="--set empty key"):
        apply_overrides({}, [".=1"])


@pytest.mark.parametrize("name,section,field,value", [
    ("ipo", "preference", "loss", "ipo"), ("kto", "preference", "loss", "kto"),
    ("online_dpo", "rollout", "n", 2), ("sppo", "rollout", "n", 4)])
def test_an_alias_keeps_its_section_defaults_under_overrides(name, section, field, value, tmp_path):
    """A trainer whose default section sets a field (``alignlab train ipo``: the loss) keeps it
    when the user sets another field of that section: pydantic alone rebuilt the section from
    the user's keys, and ``--set preference.beta=0.3`` on ``ipo`` trained DPO."""
    from alignlab.algorithms.registry import ALGORITHMS

    cls = ALGORITHMS.get(name).config_cls
    other = "beta=0.3" if section == "preference" else "prompts_per_step=3"
    cfg = load_config(cls, None, [f"{section}.{other}"])
    assert getattr(getattr(cfg, section), field) == value
    assert getattr(getattr(cfg, section), other.split("=")[0]) == (0.3 if section == "preference" else 3)
    path = tmp_path / "c.yaml"  # the same from a YAML file, and the user's own value still wins
    path.write_text(f"{section}:\n  {other.replace('=', ': ')}\n")
    assert getattr(getattr(load_config(cls, path), section), field) == value
    mine = "sigmoid" if section == "preference" else 6
    cfg = load_config(cls, path, [f"{section}.{field}={mine}"])
    assert getattr(getattr(cfg, section), field) == mine
    # the alias's train defaults survive a train override too
    cfg = load_config(cls, None, ["train.max_steps=3"])
    assert cfg.train.max_steps == 3 and cfg.train.output_dir == cls().train.output_dir


def test_auto_precision_follows_the_environment_override(monkeypatch):
    import torch

    from alignlab.core.runtime import AUTO_PRECISION_ENV, resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16")
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"  # an explicit choice wins
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp32")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="ALIGNLAB_AUTO_PRECISION: got 'fp16'; allowed values: fp32, bf16"):
        resolve_precision("auto", cpu)
    monkeypatch.delenv(AUTO_PRECISION_ENV)
    from alignlab.core import runtime
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
