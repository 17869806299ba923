"""The code sandbox, the sandboxed reward worker, and the ``python_output`` verifiable reward."""

from __future__ import annotations

import os
import textwrap
import time

import pytest

from alignlab.core.errors import ConfigError, RewardError
from alignlab.rewards.code import extract_program, same_output
from alignlab.rewards.registry import REWARDS, get_reward
from alignlab.rewards.sandbox import Limits, run_code
from alignlab.rewards.worker import RewardTimeout, sandboxed_reward

FAST = Limits(timeout_s=1.0, memory_mb=256)


def test_a_clean_program_runs_with_stdin_and_its_output_is_returned():
    res = run_code("import sys\nprint(sum(map(int, sys.stdin.read().split())))", FAST,
                   stdin="2 3 4\n")
    assert res.status == "ok" and res.ok and res.returncode == 0
    assert res.stdout == "9\n" and res.stderr == ""


def test_an_exception_is_an_error_with_its_traceback():
    res = run_code("print('before')\nraise ValueError('boom')", FAST)
    assert res.status == "error" and res.returncode == 1
    assert res.stdout == "before\n" and "ValueError: boom" in res.stderr


def test_an_infinite_loop_is_killed_at_the_deadline():
    t0 = time.monotonic()
    res = run_code("while True:\n    pass", FAST)
    assert res.status == "timeout" and time.monotonic() - t0 < 3.0


def test_the_whole_process_group_is_killed_on_timeout(tmp_path):
    # The program starts a grandchild and hangs; the grandchild must not outlive the run.
    pid_file = tmp_path / "child.pid"
    program = textwrap.dedent(f"""
        import subprocess, time
        p = subprocess.Popen(["sleep", "30"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
        time.sleep(30)
    """)
    assert run_code(program, FAST).status == "timeout"
    status = f"/proc/{int(pid_file.read_text())}/status"
    time.sleep(0.1)
    # Gone, or a zombie waiting for a PID 1 that does not reap (as in some containers).
    assert not os.path.exists(status) or "\nState:\tZ" in open(status).read()


@pytest.mark.parametrize("bomb", ["x = bytearray(2 ** 31)", "x = [0] * 10 ** 9",
                                  "x = []\nwhile True:\n    x.append(' ' * 10 ** 6)"])
def test_a_memory_bomb_is_stopped_by_the_memory_limit(bomb):
    t0 = time.monotonic()
    res = run_code(bomb, FAST)
    assert res.status == "memory", res
    assert time.monotonic() - t0 < 3.0


def test_output_is_capped_and_reported():
    res = run_code("while True:\n    print('x' * 1000)", Limits(timeout_s=5, max_output_bytes=10_000))
    assert res.status == "output_limit" and len(res.stdout) == 10_000


def test_the_program_gets_a_fresh_temp_dir_and_no_parent_environment(monkeypatch):
    monkeypatch.setenv("ALIGNLAB_SECRET_FOR_TEST", "hunter2")
    res = run_code("import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\n"
                   "print(sys.flags.isolated)", FAST)
    cwd, env, isolated = res.stdout.splitlines()
    assert "alignlab-sandbox-" in cwd and not os.path.exists(cwd)  # removed afterwards
    assert "ALIGNLAB_SECRET_FOR_TEST" not in env and isolated == "1"


def test_bad_limits_name_the_setting():
    with pytest.raises(ConfigError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(ConfigError, match="memory_mb"):
        Limits(memory_mb=-1)


# ---------------------------------------------------------------------------------- python_output

EXPECTED = "0\n1\n4\n"
RIGHT = "for i in range(3):\n    print(i * i)"


def test_extract_program_prefers_a_python_fence_and_falls_back_to_the_text():
    assert extract_program(f"Here:\n```bash\nls\n```\n```python\n{RIGHT}\n```\ndone") == RIGHT + "\n"
    assert extract_program("```\n    print(1)\n```") == "print(1)\n"  # untagged, dedented
    assert extract_program("```py\nprint(1)") == "print(1)"  # cut off by the token limit
    assert extract_program(" print(2)<|end|> junk") == "print(2)"
    assert same_output("a  \nb\n\n", "a\nb") and not same_output("a\nb", "a\nc")


def test_python_output_scores_right_wrong_and_runaway_programs_and_counts_them():
    score = get_reward("python_output", timeout_s=1.0)
    completions = [f"```python\n{RIGHT}\n```", RIGHT.replace("i * i", "i + i"),
                   "while True: pass", "x = bytearray(2 ** 31)", "print(", "no code at all"]
    t0 = time.monotonic()
    out = REWARDS.get("python_output")(["p"] * 6, completions, expected_output=[EXPECTED] * 6,
                                       timeout_s=1.0)
    assert time.monotonic() - t0 < 4.0  # one timeout of 1 s, programs run 2 at a time
    assert list(out) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert out.metrics == {"pass": 1, "wrong": 1, "timeout": 1, "memory": 1, "error": 2,
                           "output_limit": 0}
    assert score(["p"], ["print(input())"], expected_output=["hi"], stdin=["hi\n"]) == [1.0]


def test_python_output_needs_expected_output():
    with pytest.raises(RewardError, match="expected_output"):
        get_reward("python_output")(["p"], ["print(1)"])


# ---------------------------------------------------------------------------------- worker

USER_REWARDS = """
import os, time
from alignlab.rewards import RewardValues

def count_words(prompts, completions, *, bonus=0.0, label=None, **fields):
    print("user output must not corrupt the result")
    os.write(1, b"not even this\\n")
    return RewardValues([len(c.split()) + bonus for c in completions], {"calls": 1})

def sleepy(prompts, completions, **fields):
    time.sleep(30)

def raises(prompts, completions, **fields):
    raise ValueError("bad completion")

def hog(prompts, completions, **fields):
    return [len(bytearray(2 ** 33))]
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "sandboxed_user_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "sandboxed_user_rewards"


def test_worker_calls_a_user_function_batched_with_params_and_fields(user_module):
    fn = sandboxed_reward(f"{user_module}:count_words", FAST, {"bonus": 0.5})
    out = fn(["p", "q"], ["a b", "c"], label=["x", "y"])
    assert list(out) == [2.5, 1.5] and out.metrics == {"calls": 1}
    assert fn.sandboxed and not fn.per_token


def test_worker_that_hangs_is_killed_and_reported_as_a_timeout(user_module):
    fn = sandboxed_reward(f"{user_module}:sleepy", FAST)
    t0 = time.monotonic()
    with pytest.raises(RewardTimeout, match="timed out after 1 s"):
        fn(["p"], ["c"])
    assert time.monotonic() - t0 < 3.0


def test_worker_errors_come_back_as_reward_errors(user_module):
    with pytest.raises(RewardError, match="raised ValueError: bad completion"):
        sandboxed_reward(f"{user_module}:raises", FAST)(["p"], ["c"])
    with pytest.raises(RewardError, match="out of memory"):
        sandboxed_reward(f"{user_module}:hog", Limits(timeout_s=5, memory_mb=512))(["p"], ["c"])
    with pytest.raises(RewardError, match="row field 'answer' is not JSON-serialisable"):
        sandboxed_reward(f"{user_module}:count_words", FAST)(["p"], ["c"], answer=[object()])


def test_worker_runs_a_registered_reward_by_name():
    fn = sandboxed_reward("brevity", Limits(timeout_s=30, memory_mb=None), {"max_words": 4})
    assert fn(["p"], [" good ."]) == [0.5]


def test_python_output_params_are_checked_when_the_reward_is_resolved():
    from alignlab.rewards.scoring import resolve_reward

    with pytest.raises(ConfigError, match="rl.reward_params.python_output: sandbox timeout_s"):
        resolve_reward("python_output", params={"timeout_s": -1})
    with pytest.raises(ConfigError, match=r"rl.reward_params.python_output: unknown parameter\(s\) "
                                          r"timeout; allowed: expected_output, stdin, timeout_s"):
        resolve_reward("python_output", params={"timeout": 1})
