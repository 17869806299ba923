"""User rewards named in a config: ``module:function`` from the working directory without
``PYTHONPATH=.``, ``path/to/file.py:function``, and one-line errors for everything else
(issue 15)."""

from __future__ import annotations

import sys
import textwrap

import pytest

from alignlab.core.errors import ConfigError
from alignlab.rewards.sandbox import Limits
from alignlab.rewards.scoring import resolve_reward

REWARD = textwrap.dedent("""
    def length(prompts, completions, **fields):
        return [float(len(c)) for c in completions]
""")


def test_file_path_target_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "my_file_reward.py").write_text(REWARD)
    monkeypatch.chdir(tmp_path)
    for target in ("./rw/my_file_reward.py:length", "rw/my_file_reward.py:length",
                   f"{tmp_path}/rw/my_file_reward.py:length"):
        fn = resolve_reward(target)
        assert fn(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]


def test_module_in_the_working_directory_without_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "cwd_only_reward.py").write_text(REWARD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_only_reward", raising=False)
    assert resolve_reward("cwd_only_reward:length")(["p"], ["abc"]) == [3.0]


def test_file_target_runs_in_a_sandboxed_worker_from_another_directory(tmp_path, monkeypatch):
    (tmp_path / "sandboxed_file_reward.py").write_text(REWARD)
    monkeypatch.chdir(tmp_path)
    fn = resolve_reward("./sandboxed_file_reward.py:length", sandbox=Limits(timeout_s=30))
    assert list(fn(["p"], ["abcde"])) == [5.0]


@pytest.mark.parametrize("target,match", [
    ("./missing_reward.py:f", r"rl.reward: reward file ./missing_reward.py not found"),
    ("not_a_module_anywhere:f", r"no module named 'not_a_module_anywhere'.*path/to/file.py"),
    ("./broken.py:f", r"running .*broken.py raised SyntaxError.*line 1"),
    ("./raises.py:f", r"running .*raises.py raised RuntimeError: boom"),
    ("./needs_dep.py:f", r"No module named 'surely_not_installed_dep'"),
    ("./rw.py:nope", r"has no function 'nope'; it defines: length"),
    ("./rw.py:", r"must read module:function"),
    ("./rw.py:CONSTANT", r"is not callable"),
])
def test_bad_targets_are_one_line_config_errors(tmp_path, monkeypatch, target, match):
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "needs_dep.py").write_text("import surely_not_installed_dep\n")
    (tmp_path / "rw.py").write_text(REWARD + "CONSTANT = 3\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=match) as info:
        resolve_reward(target)
    assert "\n" not in str(info.value)
