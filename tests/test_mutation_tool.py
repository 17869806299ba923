"""tools/mutate.py itself: it finds mutants of a tiny module, restores a rewritten file whatever
happens, serves a mutant from memory, and tells a killed mutant from a surviving one."""

from __future__ import annotations

import importlib
import sys

import pytest

from tools import mutate

TINY = '''"""A module docstring, never mutated."""


def f(a, b):
    """A docstring."""
    if a < b:
        return a + b
    return (a * b).mean()  # pragma: no mutate
'''

TINY_TEST = '''from tiny import f


def test_f():
    assert f(1, 2) == 3
'''


def _mutants(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY, encoding="utf-8")
    return path, mutate.find_mutants(path, root=tmp_path)


def test_finds_one_mutant_per_operator_and_skips_docstrings_and_pragma_lines(tmp_path):
    _, mutants = _mutants(tmp_path)
    assert sorted(m.op for m in mutants) == sorted(["negate condition", "< → <=", "+ → -"])
    plus = next(m for m in mutants if m.op == "+ → -")
    assert plus.path == "tiny.py" and plus.line == 7 and plus.original == "a + b"
    assert plus.apply(TINY) == TINY.replace("return a + b", "return (a - b)")
    assert "tiny.py:7  [+ → -]  a + b  →  (a - b)" in plus.describe()


def test_mutated_file_is_restored_after_an_interrupt(tmp_path):
    path, mutants = _mutants(tmp_path)
    mutated = mutants[0].apply(TINY)
    with pytest.raises(KeyboardInterrupt):
        with mutate.mutated_file(path, mutated):
            assert path.read_text(encoding="utf-8") == mutated
            raise KeyboardInterrupt
    assert path.read_text(encoding="utf-8") == TINY


def test_a_mutant_is_served_from_memory(tmp_path):
    finder = mutate.MutantImporter("tiny_mutant_module", str(tmp_path / "tiny.py"), "X = 2\n")
    sys.meta_path.insert(0, finder)
    try:
        module = importlib.import_module("tiny_mutant_module")
        assert module.X == 2 and module.__file__ == str(tmp_path / "tiny.py")
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop("tiny_mutant_module", None)
    assert mutate.module_name("src/alignlab/losses/kl.py") == "alignlab.losses.kl"


def test_inplace_run_kills_a_caught_mutant_and_reports_a_missed_one(tmp_path):
    path, mutants = _mutants(tmp_path)
    (tmp_path / "test_tiny.py").write_text(TINY_TEST, encoding="utf-8")
    by_op = {m.op: m for m in mutants}

    def outcome(op):
        code = mutate.run_inplace("tiny.py", by_op[op].apply(TINY), ["test_tiny.py"], 120,
                                  root=tmp_path)
        assert path.read_text(encoding="utf-8") == TINY
        return mutate.verdict(code)

    assert outcome("+ → -") == "killed"
    assert outcome("< → <=") == "survived"  # f(1, 2) never reaches a == b
    assert mutate.verdict(None) == "timeout" and mutate.verdict(4) == "error"
