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
