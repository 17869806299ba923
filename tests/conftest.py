"""Shared fixtures: the tiny world (built once per test session) and tiny random models."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's bounds hold in fp32 on every machine: ``precision: auto`` would be bf16 on a CPU
# with native bf16 and fp32 on an AVX2 one. Tests of bf16 set it explicitly. Subprocesses inherit.
os.environ.setdefault("ALIGNLAB_AUTO_PRECISION", "fp32")


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory) -> str:
    """``ALIGNLAB_TEST_CACHE`` keeps the tiny world between runs; otherwise a fresh temp dir."""
    return os.environ.get("ALIGNLAB_TEST_CACHE") or str(tmp_path_factory.mktemp("alignlab-cache"))


@pytest.fixture(scope="session")
def tiny_world(world_cache):
    from alignlab.world.build import ensure_world

    return ensure_world("tiny", seed=0, cache_dir=world_cache, progress=False)


def random_llama(vocab_size: int = 64, hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=2 * hidden,
                      max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def random_examples(n: int, vocab_size: int = 64, seed: int = 0) -> list[dict]:
    """Examples of uneven length with a prompt part (mask 0) and a completion part (mask 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, c = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        ids = torch.randint(1, vocab_size, (p + c,), generator=g).tolist()
        out.append({"input_ids": ids, "loss_mask": [0] * p + [1] * c})
    return out


def heldout_pairs(world, n: int = 64):
    """``(task, tokenizer, base model, examples)``: tokenized pairs on the ``positive`` task's
    *eval* prompts, chosen all-positive and rejected all-negative."""
    import random

    from alignlab.data.loading import rows_from_list
    from alignlab.data.tokenize import tokenize_rows
    from alignlab.models.loading import load_model, load_tokenizer
    from alignlab.world import language as lang

    task = world.task("positive")
    tok = load_tokenizer(str(world.base_dir))
    by_text = {p.text: p for p in lang.all_review_prefixes()}
    rng = random.Random(5)
    rows = [{"prompt": t, "chosen": lang.complete_review(rng, by_text[t], 1.0),
             "rejected": lang.complete_review(rng, by_text[t], 0.0)} for t in task.eval_prompts[:n]]
    examples = tokenize_rows(rows_from_list(rows, format="preference"), tok).examples
    return task, tok, load_model(str(world.base_dir)), examples


def online_config(world_cache: str, output_dir, rl, steps: int = 10):
    """A tiny-world online-RL config on ``positive`` (8 prompts × 4 per iteration) around ``rl``."""
    from alignlab.algorithms.policy_gradient.config import OnlineRLConfig
    from alignlab.core.config import RolloutSection, TrainSection, WorldSection

    return OnlineRLConfig(
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        train=TrainSection(output_dir=str(output_dir), max_steps=steps, lr=5e-4, batch_size=32,
                           log_every=1, progress=False, tensorboard=False,
                           lr_scheduler="constant"),
        rollout=RolloutSection(prompts="world:positive", prompts_per_step=8, n=4), rl=rl)


@pytest.fixture(scope="session")
def family_runs(tiny_world, world_cache, tmp_path_factory):
    """Memoised tiny-world runs of sft, dpo, reward and grpo (``tests/invariant_runs.py``)."""
    from tests.invariant_runs import FamilyRuns

    return FamilyRuns(world_cache, tmp_path_factory.mktemp("invariants"))


@pytest.fixture(autouse=True)
def _fresh_notices():
    """Each test starts with no warning causes seen (``core/notices.py`` shows each once)."""
    from alignlab.core import notices

    notices.reset()
    yield
