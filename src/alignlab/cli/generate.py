"""``alignlab generate`` and ``alignlab chat``: sample from a model with the rollout engine.

Both sample through ``rollout/sampling.py: sample`` (the engine of the RL trainers' rollouts),
so temperature, top-k/top-p/min-p, stop strings and seeds behave as in training. Prompts given
as lists of messages go through the tokenizer's chat template, as the trainers render them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from alignlab.core.errors import ConfigError

ModelArg = Annotated[str, typer.Argument(
    help="A run's final/ directory, any local Hugging Face causal-LM directory or Hub name, or "
         "world:base.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set of tokens "
                                             "with this much probability (1: off).")]
TopKOpt = Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")]
MinPOpt = Annotated[float, typer.Option(help="Drop tokens below min_p × the top probability (0: off).")]
MaxNewOpt = Annotated[Optional[int], typer.Option(
    help="Tokens per completion at most (default 64, or the world task's own).")]
SeedOpt = Annotated[int, typer.Option(help="Sampling seed: the same seed gives the same completions.")]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", help="End a completion at this string, which is cut off (repeatable).")]
BatchOpt = Annotated[int, typer.Option(help="Completions decoded together at most.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")]
PresetOpt = Annotated[str, typer.Option(help="World preset of world: names: full or tiny.")]
WorldSeedOpt = Annotated[int, typer.Option(help="World seed of world: names.")]
CacheOpt = Annotated[Optional[str], typer.Option(
    help="World cache folder (default $ALIGNLAB_CACHE or ~/.cache/alignlab).")]

DEFAULT_MAX_NEW_TOKENS = 64


def _load(model: str, preset: str, world_seed: int, cache_dir: str | None, device: str):
    from alignlab.algorithms.common import load_policy
    from alignlab.core.config import ModelSection, WorldSection
    from alignlab.core.runtime import pick_device

    world = WorldSection(preset=preset, seed=world_seed, cache_dir=cache_dir)
    policy, tokenizer = load_policy(ModelSection(name_or_path=model), world)
    return policy.to(pick_device(device)).eval(), tokenizer


def generate(
    model: ModelArg,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", help="A prompt, used as the text to continue (repeatable).")] = None,
    prompts: Annotated[Optional[str], typer.Option(
        help="JSONL/Parquet file of rows with a 'prompt' column (a string, or a list of chat "
             "messages rendered with the chat template), or world:<task> for a task's eval "
             "prompts. Extra columns are copied to the output rows.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Write JSONL here, one row per completion: prompt, completion, finish_reason "
             "(eos, stop or length), prompt_index, sample_index. Default: print.")] = None,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Send each --prompt as a user message through the chat template.")] = False,
    n: Annotated[int, typer.Option("--n", "-n", help="Completions per prompt.")] = 1,
    temperature: TemperatureOpt = 1.0, top_p: TopPOpt = 1.0, top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = 0,
    stop: StopOpt = None, batch_size: BatchOpt = 64, device: DeviceOpt = "auto",
    preset: PresetOpt = "full", world_seed: WorldSeedOpt = 0, cache_dir: CacheOpt = None,
) -> None:
    """Sample completions of prompts from MODEL with the rollout engine's sampling options."""
    from alignlab.core.config import WorldSection
    from alignlab.core.io import atomic_write_text
    from alignlab.eval.user import prompt_texts, read_prompt_rows
    from alignlab.rollout.sampling import sample

    world = WorldSection(preset=preset, seed=world_seed, cache_dir=cache_dir)
    rows, task = [], None
    if prompts is not None:  # read (and validate) the file before the slow model load
        given = read_prompt_rows(prompts, world)
        rows, task = given.rows, given.task
    rows += [{"prompt": [{"role": "user", "content": t}] if chat else t} for t in prompt or []]
    if not rows:
        raise ConfigError("give prompts: --prompt TEXT (repeatable) or --prompts FILE")
    params = _sampling(n, temperature, top_p, top_k, min_p, max_new_tokens, seed, stop, task)
    policy, tokenizer = _load(model, preset, world_seed, cache_dir, device)
    texts = prompt_texts(rows, tokenizer, "--prompts" if prompts is not None else "--prompt")
    s = sample(policy, tokenizer, texts, batch_size=batch_size, **params)
    results = []
    for k, (completion, reason) in enumerate(zip(s.completions, s.finish_reasons)):
        i, j = divmod(k, n)
        results.append({**rows[i], "completion": completion, "finish_reason": reason,
                        "prompt_index": i, "sample_index": j})
    if out is None:
        for r, text in zip(results, s.prompts):
            typer.echo(f"--- prompt {r['prompt_index']}, sample {r['sample_index']} "
                       f"({r['finish_reason']})\n{text}{r['completion']}")
        return
    # default=str: a Parquet column of dates or decimals is still written, as text
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                   for r in results))
    typer.echo(f"wrote {len(results)} completions of {len(rows)} prompts to {out}", err=True)


def _sampling(n: int, temperature: float, top_p: float, top_k: int, min_p: float,
              max_new_tokens: int | None, seed: int, stop: list[str] | None,
              task: Any = None) -> dict[str, Any]:
    """``sample``'s keyword arguments, checked now (``SamplingParams`` names a bad value)."""
    from alignlab.rollout.engine import SamplingParams

    max_new = max_new_tokens or (task.max_new_tokens if task is not None else DEFAULT_MAX_NEW_TOKENS)
    kwargs = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                  max_new_tokens=max_new, seed=seed, stop=tuple(stop or ()))
    SamplingParams(**kwargs)
    return kwargs


class ChatSession:
    """One conversation and the prompt it makes: the tokenizer's chat template with the
    generation prompt when it has one (as the trainers render messages), else the turns'
    texts joined by ``separator``, for a model that only continues text."""

    def __init__(self, model: Any, tokenizer: Any, sampling: dict[str, Any], *,
                 system: str | None = None, separator: str = "\n") -> None:
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.system, self.separator = system, separator
        self.reset()

    def reset(self) -> None:
        """Forget every turn; the next reply is sampled as the first of a new session's."""
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": self.system}] if self.system else [])
        self.turns = 0

    def prompt(self, user_text: str) -> str:
        """The text the model continues after the conversation so far and ``user_text``."""
        messages = self.messages + [{"role": "user", "content": user_text}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        return self.separator.join(m["content"] for m in messages)

    def reply(self, user_text: str) -> str:
        """Sample the model's reply to ``user_text`` and add both turns to the conversation.

        Turn t samples with seed ``seed + t``: a session is reproducible, and the turns differ."""
        from alignlab.rollout.sampling import sample

        params = {**self.sampling, "n": 1, "seed": self.sampling["seed"] + self.turns}
        answer = sample(self.model, self.tokenizer, [self.prompt(user_text)], **params).completions[0]
        self.messages += [{"role": "user", "content": user_text},
                          {"role": "assistant", "content": answer}]
        self.turns += 1
        return answer


def chat(
    model: ModelArg,
    system: Annotated[Optional[str], typer.Option(help="A system message opening the conversation.")] = None,
    separator: Annotated[str, typer.Option(
        help="Joins the turns of a model whose tokenizer has no chat template.")] = "\n",
    show_prompt: Annotated[bool, typer.Option(
        "--show-prompt", help="Print the full prompt the model continues before each reply.")] = False,
    temperature: TemperatureOpt = 1.0, top_p: TopPOpt = 1.0, top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = 0,
    stop: StopOpt = None, device: DeviceOpt = "auto",
    preset: PresetOpt = "full", world_seed: WorldSeedOpt = 0, cache_dir: CacheOpt = None,
) -> None:
    """Talk with MODEL: one user turn a line on stdin, the conversation kept between turns.

    /reset starts a new conversation, /exit (or end of input) quits. Works on piped input:
    printf 'hello\\n/exit\\n' | alignlab chat world:base
    """
    params = _sampling(1, temperature, top_p, top_k, min_p, max_new_tokens, seed, stop)
    policy, tokenizer = _load(model, preset, world_seed, cache_dir, device)
    session = ChatSession(policy, tokenizer, params, system=system, separator=separator)
    template = "its chat template" if getattr(tokenizer, "chat_template", None) else "no chat template"
    typer.echo(f"chatting with {model} ({template}); /reset starts over, /exit quits", err=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        text = line.strip()
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            typer.echo("(new conversation)")
        elif text:
            if show_prompt:
                typer.echo(f"[prompt] {session.prompt(text)}")
            typer.echo(f"assistant> {session.reply(text).strip()}")


__all__ = ["ChatSession", "chat", "generate"]
