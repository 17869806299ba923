"""``alignlab generate`` and ``alignlab chat`` on the tiny world, checked by value against the
rollout engine they sample with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignlab.cli.generate import ChatSession
from alignlab.cli.main import app
from alignlab.core.errors import DataError
from alignlab.models.loading import load_model, load_tokenizer
from alignlab.rollout.sampling import sample

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _world(cache: str) -> list[str]:
    return ["--preset", "tiny", "--cache-dir", cache]


def _generate(args: list[str], cache: str, out: Path) -> list[dict]:
    result = runner.invoke(app, ["generate", "world:base", *args, "--out", str(out), *_world(cache)])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tiny_world):
    return load_model(str(tiny_world.base_dir)).eval(), load_tokenizer(str(tiny_world.base_dir))


def test_generate_is_reproducible_and_honours_n_and_max_new_tokens(tiny_world, world_cache,
                                                                   tmp_path, base):
    prompts = tiny_world.task("positive").eval_prompts[:2]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p, "id": 10 + i}) + "\n"
                            for i, p in enumerate(prompts)))
    args = ["--prompts", str(file), "-n", "3", "--max-new-tokens", "4", "--seed", "7"]
    first = _generate(args, world_cache, tmp_path / "a.jsonl")
    assert first == _generate(args, world_cache, tmp_path / "b.jsonl")
    assert [(r["prompt_index"], r["sample_index"], r["id"], r["prompt"]) for r in first] == [
        (i, j, 10 + i, prompts[i]) for i in range(2) for j in range(3)]
    # The same draws as the engine itself with these options: max_new_tokens is its cut.
    model, tok = base
    s = sample(model, tok, prompts, n=3, max_new_tokens=4, seed=7)
    assert [r["completion"] for r in first] == s.completions
    assert [r["finish_reason"] for r in first] == s.finish_reasons
    assert all(len(ids) <= 4 for ids in s.completion_ids) and "length" in s.finish_reasons
    other = _generate([*args[:-1], "8"], world_cache, tmp_path / "c.jsonl")
    assert [r["completion"] for r in other] != [r["completion"] for r in first]


def test_generate_stop_string_cuts_where_the_unstopped_text_has_it(tiny_world, world_cache,
                                                                  tmp_path):
    prompt = tiny_world.task("positive").eval_prompts[0]
    args = ["--prompt", prompt, "--max-new-tokens", "24", "--seed", "3"]
    [free] = _generate(args, world_cache, tmp_path / "free.jsonl")
    words = free["completion"].split()
    assert len(words) >= 3, free
    stop = " " + words[1]
    [cut] = _generate([*args, "--stop", stop], world_cache, tmp_path / "cut.jsonl")
    assert cut["finish_reason"] == "stop"
    assert cut["completion"] == free["completion"][:free["completion"].index(stop)]


def test_generate_renders_messages_with_the_chat_template(tiny_world, world_cache, tmp_path, base):
    model, tok = base
    messages = [{"role": "user", "content": "write a review of the cafe ."}]
    file = tmp_path / "chat.jsonl"
    file.write_text(json.dumps({"prompt": messages}) + "\n")
    [row] = _generate(["--prompts", str(file), "--temperature", "0"], world_cache,
                      tmp_path / "out.jsonl")
    [as_flag] = _generate(["--chat", "--prompt", messages[0]["content"], "--temperature", "0"],
                          world_cache, tmp_path / "flag.jsonl")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert row["prompt"] == messages and as_flag["prompt"] == messages
    expected = sample(model, tok, [text], temperature=0.0, max_new_tokens=64).completions[0]
    assert row["completion"] == as_flag["completion"] == expected


def test_generate_prints_without_out(tiny_world, world_cache):
    result = runner.invoke(app, ["generate", "world:base", "--prompt", "the", "--prompt", "a",
                                 "--max-new-tokens", "3", *_world(world_cache)])
    assert result.exit_code == 0, result.output
    assert result.output.count("--- prompt") == 2 and "--- prompt 1, sample 0" in result.output


def test_bad_prompt_files_name_file_line_and_field(tiny_world, world_cache, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    cases = {'{"prompt": "ok"}\n{"prompt": 5}\n': ":2: field 'prompt'",
             '{"text": "no prompt column"}\n': ":1: field 'prompt'",
             '{"prompt": "ok"}\n{"prompt": \n': ":2: invalid JSON"}
    for content, where in cases.items():
        bad.write_text(content)
        result = runner.invoke(app, ["generate", "world:base", "--prompts", str(bad),
                                     *_world(world_cache)])
        assert isinstance(result.exception, DataError), result.output
        assert f"{bad}{where}" in str(result.exception)
    result = runner.invoke(app, ["generate", "world:base", *_world(world_cache)])
    assert "--prompt TEXT" in str(result.exception)
    # As a user sees it: one line on stderr, exit status 2, no traceback.
    bad.write_text('{"prompt": "ok"}\n{"prompt": 5}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-m", "alignlab.cli", "generate", "world:base",
                           "--prompts", "prompts.jsonl", *_world(world_cache)],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: prompts.jsonl:2: field 'prompt': ")
    assert "Traceback" not in proc.stderr


def test_chat_keeps_the_conversation_and_reset_clears_it(tiny_world, world_cache):
    result = runner.invoke(app, ["chat", "world:base", "--show-prompt", "--max-new-tokens", "8",
                                 *_world(world_cache)],
                           input="hello\nand then\n/reset\nhello\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    prompts = [line[len("[prompt] "):] for line in result.output.splitlines()
               if line.startswith("[prompt] ")]
    replies = [line[len("assistant> "):] for line in result.output.splitlines()
               if line.startswith("assistant> ")]
    assert len(prompts) == len(replies) == 3 and "(new conversation)" in result.output
    assert prompts[0] == "<|user|> hello<|end|><|assistant|>"
    # The second turn continues the first: its user turn and the model's reply.
    assert prompts[1] == (f"<|user|> hello<|end|><|assistant|> {replies[0].strip()}<|end|>"
                          "<|user|> and then<|end|><|assistant|>")
    # After /reset the session starts over: the same prompt and, seeded by turn, the same reply.
    assert prompts[2] == prompts[0] and replies[2] == replies[0]


def test_chat_without_a_template_concatenates_the_turns(tiny_world, base):
    model, _ = base
    tok = load_tokenizer(str(tiny_world.base_dir))
    tok.chat_template = None
    session = ChatSession(model, tok, {"max_new_tokens": 6, "seed": 0, "temperature": 1.0},
                          separator=" |")
    reply = session.reply("the food")
    assert session.prompt("next") == f"the food |{reply} |next"
    session.reset()
    assert session.prompt("next") == "next" and session.reply("the food") == reply
