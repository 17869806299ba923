"""The built world: reproducible, loadable with plain transformers, a real language model."""

from __future__ import annotations

import statistics

from transformers import AutoModelForCausalLM, AutoTokenizer

from alignlab.core.config import EvalSection
from alignlab.eval.evaluate import evaluate
from alignlab.world.build import build_corpus_and_tokenizer
from alignlab.world.presets import get_preset


def test_same_seed_gives_identical_corpus_and_tokenizer(tiny_world, tmp_path):
    a = build_corpus_and_tokenizer(tmp_path / "a", get_preset("tiny"), seed=0)
    b = build_corpus_and_tokenizer(tmp_path / "b", get_preset("tiny"), seed=0)
    c = build_corpus_and_tokenizer(tmp_path / "c", get_preset("tiny"), seed=1)
    for key in ("corpus_sha256", "tokenizer_sha256", "heldout_sha256"):
        assert a[key] == b[key] == tiny_world.manifest[key]
    assert c["corpus_sha256"] != a["corpus_sha256"]


def test_base_model_loads_with_auto_classes_and_beats_unigram(tiny_world):
    model = AutoModelForCausalLM.from_pretrained(tiny_world.base_dir)
    tok = AutoTokenizer.from_pretrained(tiny_world.base_dir)
    assert (tiny_world.base_dir / "model.safetensors").exists()
    assert tok.eos_token == "<|end|>" and tok.pad_token_id is not None
    assert tok.chat_template
    assert sum(p.numel() for p in model.parameters()) == tiny_world.manifest["n_parameters"]
    m = tiny_world.manifest
    # A real model of the language: far below the unigram baseline's perplexity.
    assert m["heldout_ppl"] < 0.1 * m["heldout_unigram_ppl"], m


def test_base_model_samples_are_fluent_and_mixed_in_sentiment(tiny_world):
    model = AutoModelForCausalLM.from_pretrained(tiny_world.base_dir)
    tok = AutoTokenizer.from_pretrained(tiny_world.base_dir)
    task = tiny_world.task("positive")
    result = evaluate(model, tok, task, EvalSection(n_prompts=48, samples_per_prompt=2, seed=3))
    gold = [e["gold"] for e in result["examples"]]
    m = result["metrics"]
    assert m["gold_std"] > 0.3, m  # mixed: room for feedback to improve it
    assert -0.5 < m["gold_mean"] < 0.6, m
    assert m["hit_length_limit"] < 0.2, m  # ends its reviews with eos
    assert all(isinstance(g, float) for g in gold)
    words = " ".join(e["completion"] for e in result["examples"]).split()
    assert statistics.fmean(w in {".", "the", "was", "were", "and", "but", "i"} for w in words) > 0.2


def test_pretraining_runs_in_fp32_whatever_auto_means_here(monkeypatch, tmp_path):
    """The same preset and seed make the same world on a CPU with native bf16 and on an AVX2 one
    (under ``precision: auto`` the first pretrained in bf16: a different base model)."""
    import pytest

    from alignlab.world import build

    seen = {}

    def stop_at_training(model, objective, batches, cfg, **_):
        seen["precision"] = cfg.precision
        raise KeyboardInterrupt

    monkeypatch.setenv("ALIGNLAB_AUTO_PRECISION", "bf16")
    monkeypatch.setattr(build, "train", stop_at_training)
    with pytest.raises(KeyboardInterrupt):
        build.build_world(tmp_path / "w", get_preset("tiny"), 0, progress=False)
    assert seen == {"precision": "fp32"}
    assert not (tmp_path / "w").exists()  # nothing half-built is left under the world's name
