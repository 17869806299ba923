"""Reference log-probs: computed once with the frozen reference, cached, never from the policy."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from alignlab.algorithms.preference.reference import (
    CACHE_FILE,
    attach_reference_logps,
    compute_reference_logps,
    load_reference_cache,
)
from alignlab.algorithms.preference.trainer import (
    PreferenceConfig,
    PreferenceSection,
    run_preference,
)
from alignlab.core.config import DataSection, TrainSection, WorldSection
from alignlab.data.collate import join_prompt_completion, pad_collate
from alignlab.models.loading import load_model
from alignlab.models.logprobs import sequence_logprobs, token_logprobs

from tests.conftest import random_llama


def _pairs(n=6):
    g = torch.Generator().manual_seed(0)
    r = lambda k: torch.randint(1, 64, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": r(3 + i % 4), "chosen_ids": r(2 + i % 3), "rejected_ids": r(4 - i % 3)}
            for i in range(n)]


def _direct(model, examples):
    seqs = [join_prompt_completion(e["prompt_ids"], c) for e in examples
            for c in (e["chosen_ids"], e["rejected_ids"])]
    batch = pad_collate(seqs, 0)
    with torch.no_grad():
        return sequence_logprobs(token_logprobs(model, batch), batch).view(-1, 2).tolist()


def test_reference_values_equal_direct_computation_and_are_cached(tmp_path):
    model = random_llama(seed=4).float()
    examples = _pairs()
    got = compute_reference_logps(model, examples, 0, batch_size=4, device=torch.device("cpu"))
    for g, d in zip(got, _direct(model, examples)):
        assert abs(g[0] - d[0]) < 1e-5 and abs(g[1] - d[1]) < 1e-5

    calls = []

    def load():
        calls.append(1)
        return model

    ref_a, ref_b = str(tmp_path / "ref-a"), str(tmp_path / "ref-b")
    model.save_pretrained(ref_a)
    random_llama(seed=5).save_pretrained(ref_b)
    kw = dict(output_dir=tmp_path, batch_size=4, device=torch.device("cpu"), precision="fp32")
    assert not attach_reference_logps(examples, load, ref_a, 0, **kw)
    assert attach_reference_logps(examples, load, ref_a, 0, **kw)  # reused: no model load
    assert len(calls) == 1
    assert all(abs(a - b) < 1e-9 for e, v in zip(examples, got) for a, b in zip(e["ref_logps"], v))
    # Another reference model or other data invalidate the cache.
    assert not attach_reference_logps(examples, load, ref_b, 0, **kw)
    examples[0]["chosen_ids"] = examples[0]["chosen_ids"] + [5]
    assert not attach_reference_logps(examples, load, ref_b, 0, **kw)
    assert len(calls) == 3


def test_new_weights_at_the_same_path_recompute_the_reference(tmp_path):
    """The cache is keyed on the reference's bytes, not its path (issue 15)."""
    examples, ref = _pairs(), tmp_path / "ref"
    kw = dict(output_dir=tmp_path / "run", batch_size=4, device=torch.device("cpu"), precision="fp32")
    model_a, model_b = random_llama(seed=4).float(), random_llama(seed=5).float()
    model_a.save_pretrained(ref)
    assert not attach_reference_logps(examples, lambda: model_a, str(ref), 0, **kw)
    values_a = [list(e["ref_logps"]) for e in examples]
    model_b.save_pretrained(ref)  # same path, same file sizes, new weights
    assert not attach_reference_logps(examples, lambda: model_b, str(ref), 0, **kw)
    assert [e["ref_logps"] for e in examples] == compute_reference_logps(
        model_b, examples, 0, batch_size=4, device=torch.device("cpu"))
    assert [e["ref_logps"] for e in examples] != values_a
    assert attach_reference_logps(examples, lambda: model_b, str(ref), 0, **kw)


def test_reference_without_a_directory_is_keyed_on_its_tensors(tmp_path):
    examples = _pairs()
    kw = dict(output_dir=tmp_path, batch_size=4, device=torch.device("cpu"), precision="fp32")
    model_a, model_b = random_llama(seed=4).float(), random_llama(seed=5).float()
    assert not attach_reference_logps(examples, lambda: model_a, "org/ref", 0, **kw)
    assert attach_reference_logps(examples, lambda: model_a, "org/ref", 0, **kw)
    assert not attach_reference_logps(examples, lambda: model_b, "org/ref", 0, **kw)


def test_per_token_reference_values_sum_to_the_sequence_values(tmp_path):
    model = random_llama(seed=4).float()
    examples = _pairs()
    sums = compute_reference_logps(model, examples, 0, batch_size=4, device=torch.device("cpu"))
    kw = dict(output_dir=tmp_path, batch_size=4, device=torch.device("cpu"), precision="fp32")
    assert not attach_reference_logps(examples, lambda: model, "ref-a", 0, field="ref_token_logps",
                                      cache_file="tokens.safetensors", per_token=True, **kw)
    for e, (c, r) in zip(examples, sums):
        values, n_c = e["ref_token_logps"], len(e["chosen_ids"])
        assert len(values) == n_c + len(e["rejected_ids"])
        assert abs(sum(values[:n_c]) - c) < 1e-4 and abs(sum(values[n_c:]) - r) < 1e-4
    assert not (tmp_path / CACHE_FILE).exists()  # its own cache file, not the sums'
    assert attach_reference_logps(examples, lambda: model, "ref-a", 0, field="ref_token_logps",
                                  cache_file="tokens.safetensors", per_token=True, **kw)


def _cfg(world_cache, out, steps, resume=False, loss="dpo"):
    return PreferenceConfig(
        data=DataSection(source="world:positive", limit=64, max_length=96),
        train=TrainSection(output_dir=str(out), max_steps=steps, batch_size=8, lr=5e-4,
                           save_every=3, resume=resume, log_every=1, progress=False,
                           tensorboard=False, precision="fp32"),
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        preference=PreferenceSection(loss=loss))


def test_reference_comes_from_the_untrained_model_and_resume_reuses_it(tiny_world, world_cache, tmp_path):
    run = run_preference(_cfg(world_cache, tmp_path, steps=6))
    assert run.reference_cache_hit is False
    base = load_model(str(tiny_world.base_dir))
    direct = _direct(base, run.examples[:16])
    for e, d in zip(run.examples[:16], direct):
        assert abs(e["ref_logps"][0] - d[0]) < 1e-4 and abs(e["ref_logps"][1] - d[1]) < 1e-4
    # The policy moved (training happened) but the stored reference did not.
    trained = _direct(run.model.cpu(), run.examples[:16])
    assert max(abs(t[0] - d[0]) for t, d in zip(trained, direct)) > 0.5
    cached = load_file(str(tmp_path / CACHE_FILE))["values"]
    assert cached[:2].tolist() == run.examples[0]["ref_logps"]
    # Resume: the loop restarts from the step-6 checkpoint; the reference is read, not recomputed.
    again = run_preference(_cfg(world_cache, tmp_path, steps=9, resume=True))
    assert again.reference_cache_hit is True
    assert again.result.history[0]["step"] == 7
    assert torch.equal(load_file(str(tmp_path / CACHE_FILE))["values"], cached)


def test_reference_free_loss_skips_the_reference_model(tiny_world, world_cache, tmp_path):
    run = run_preference(_cfg(world_cache, tmp_path, steps=2, loss="simpo"))
    assert run.reference_cache_hit is None
    assert not (tmp_path / CACHE_FILE).exists()
    assert "ref_logps" not in run.examples[0]
    assert load_reference_cache(tmp_path / CACHE_FILE, "x") is None


def test_dpo_on_new_weights_at_the_same_path_starts_at_ln2(tiny_world, world_cache, tmp_path):
    """Issue 15: a model re-saved at the same path, same output_dir, must not reuse the old
    reference log-probs (step 1 of DPO with policy == reference has loss ln 2)."""
    import math
    import shutil

    from alignlab.models.loading import load_tokenizer

    path = tmp_path / "model"
    shutil.copytree(tiny_world.base_dir, path)
    cfg = _cfg(world_cache, tmp_path / "run", steps=1)
    cfg.model.name_or_path = str(path)
    first = run_preference(cfg)
    assert first.reference_cache_hit is False
    assert abs(first.result.history[0]["loss"] - math.log(2)) < 1e-5
    other = load_model(str(path), dtype="float32")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(path)
    load_tokenizer(str(tiny_world.base_dir)).save_pretrained(path)
    cfg.train.overwrite = True  # a new run in the same directory (its caches kept)
    second = run_preference(cfg)
    assert second.reference_cache_hit is False
    assert abs(second.result.history[0]["loss"] - math.log(2)) < 1e-5
