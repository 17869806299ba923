"""Build the feedback world: corpus → BPE tokenizer → tiny Llama pretrained by our SFT loop.

``ensure_world`` returns a cached world or builds it (written under a temporary name and
renamed into place, so an interrupted build never leaves a half world behind). The base model
is saved with ``save_pretrained`` (safetensors) and loads with
``AutoModelForCausalLM.from_pretrained(world.base_dir)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from alignlab.core.config import DataSection, TrainSection
from alignlab.core.io import atomic_write_json, replace_dir
from alignlab.core.runtime import default_cache_dir, seed_everything
from alignlab.data.batches import make_batches
from alignlab.data.loading import rows_from_list
from alignlab.data.tokenize import tokenize_rows
from alignlab.engine import distributed
from alignlab.engine.loop import train
from alignlab.engine.objectives import NLLObjective
from alignlab.engine.scoring import perplexity
from alignlab.world.language import generate_corpus
from alignlab.world.presets import WorldPreset, get_preset
from alignlab.world.tasks import Task, make_task
from alignlab.world.tokenizer import train_tokenizer

# Bumped whenever the build makes a different world for the same preset and seed (2: pretraining
# attends per packed sequence, so the base model differs from version 1 in its rounding; 3: it
# always runs in fp32: under ``precision: auto`` a CPU with native bf16 pretrained a different
# base model from an AVX2 one under the same cache key).
WORLD_VERSION = 3


@dataclass
class World:
    """A built world on disk."""

    path: Path
    preset: WorldPreset
    seed: int

    @property
    def base_dir(self) -> Path:
        return self.path / "base"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    def corpus(self, split: str = "train") -> list[str]:
        return (self.path / f"{split}.txt").read_text(encoding="utf-8").splitlines()

    def task(self, name: str) -> Task:
        return make_task(name, seed=self.seed, n_train=self.preset.n_train_prompts,
                         n_eval=self.preset.n_eval_prompts)

    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.tokenizer_dir)


def world_path(preset: str, seed: int, cache_dir: str | None) -> Path:
    """The cache folder; its name carries a hash of the preset so a changed preset rebuilds."""
    digest = hashlib.sha256(json.dumps(get_preset(preset).to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return Path(cache_dir or default_cache_dir()) / f"world-v{WORLD_VERSION}-{preset}-seed{seed}-{digest}"


def ensure_world(preset: str = "full", seed: int = 0, cache_dir: str | None = None, *,
                 force: bool = False, progress: bool = True) -> World:
    """The world of ``preset`` and ``seed``, built into the cache first if it is not there.

    One process builds it; others asking for the same world meanwhile (the ranks of a
    data-parallel run, parallel bench jobs) wait on a file lock and then find it built. The
    build trains as a single process even inside a distributed run."""
    path = world_path(preset, seed, cache_dir)
    if force or not (path / "manifest.json").exists():
        with _lock(path), distributed.local():
            if force or not (path / "manifest.json").exists():
                build_world(path, get_preset(preset), seed, progress=progress)
    return World(path, get_preset(preset), seed)


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def unigram_perplexity(train_ids: list[list[int]], eval_ids: list[list[int]], vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model on the tokens a LM would be scored on."""
    counts = Counter(t for seq in train_ids for t in seq[1:])
    total = sum(counts.values()) + vocab_size
    nll = n = 0
    for seq in eval_ids:
        for t in seq[1:]:
            nll -= math.log((counts[t] + 1) / total)
            n += 1
    return math.exp(nll / n)


def build_corpus_and_tokenizer(folder: Path, preset: WorldPreset, seed: int) -> dict[str, str]:
    """Write ``train.txt``, ``heldout.txt`` and ``tokenizer/`` into ``folder``; return their hashes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = generate_corpus(seed, preset.n_documents)
    heldout = generate_corpus(seed + 7_919_333, preset.n_heldout)
    (folder / "train.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    (folder / "heldout.txt").write_text("\n".join(heldout) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer(corpus, vocab_size=preset.vocab_size,
                                model_max_length=preset.max_position_embeddings)
    tokenizer.save_pretrained(folder / "tokenizer")
    return {"corpus_sha256": _sha(corpus), "heldout_sha256": _sha(heldout),
            "tokenizer_sha256": hashlib.sha256((folder / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()}


def build_world(path: Path, preset: WorldPreset, seed: int, *, progress: bool = True) -> World:

    t0 = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        hashes = build_corpus_and_tokenizer(tmp, preset, seed)
        corpus = (tmp / "train.txt").read_text(encoding="utf-8").splitlines()
        heldout = (tmp / "heldout.txt").read_text(encoding="utf-8").splitlines()
        tokenizer = AutoTokenizer.from_pretrained(tmp / "tokenizer")
        t_tok = time.time() - t0

        seed_everything(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=preset.hidden_size,
            num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_heads,
            num_key_value_heads=preset.num_heads, intermediate_size=preset.intermediate_size,
            max_position_embeddings=preset.max_position_embeddings, tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())

        data = DataSection(source="<world corpus>", max_length=preset.max_position_embeddings,
                           truncation="truncate_completion", packing=True)
        rows = rows_from_list([{"text": d} for d in corpus], format="text")
        examples = tokenize_rows(rows, tokenizer, max_length=data.max_length).examples
        train_cfg = TrainSection(
            output_dir=str(tmp / "pretrain"), seed=seed, max_steps=preset.pretrain_steps,
            batch_size=preset.pretrain_batch_size, lr=preset.pretrain_lr, weight_decay=0.01,
            lr_scheduler="cosine", warmup_steps=max(1, preset.pretrain_steps // 20),
            precision="fp32",  # one world per preset and seed, whatever the machine computes in
            log_every=max(1, preset.pretrain_steps // 20), tensorboard=False, progress=progress)
        batches = make_batches(examples, tokenizer.pad_token_id, data, train_cfg)
        result = train(model, NLLObjective(), batches, train_cfg, description=f"pretrain {preset.name} world")
        model.eval()
        model.save_pretrained(tmp / "base")
        tokenizer.save_pretrained(tmp / "base")

        eval_ids = [tokenizer(h)["input_ids"] + [tokenizer.eos_token_id] for h in heldout]
        train_ids = [ex["input_ids"] for ex in examples]
        manifest = {
            "version": WORLD_VERSION, "preset": preset.to_dict(), "seed": seed,
            **hashes,
            "vocab_size": len(tokenizer), "n_parameters": n_params,
            "train_tokens_seen": int(sum(len(x) for x in train_ids) * min(1.0, preset.pretrain_steps
                                     * preset.pretrain_batch_size / len(train_ids))),
            "final_pretrain_loss": result.history[-1]["loss"] if result.history else None,
            "heldout_ppl": perplexity(model, tokenizer, heldout),
            "heldout_unigram_ppl": unigram_perplexity(train_ids, eval_ids, len(tokenizer)),
            "tokenizer_seconds": round(t_tok, 2), "build_seconds": round(time.time() - t0, 2),
            "torch_threads": torch.get_num_threads(),
        }
        shutil.rmtree(tmp / "pretrain", ignore_errors=True)
        atomic_write_json(tmp / "manifest.json", manifest)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return World(path, preset, seed)
