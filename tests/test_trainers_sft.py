"""SFT learns: demonstrations of positive reviews raise the gold sentiment reward."""

from __future__ import annotations

import pytest
import torch

from alignlab.algorithms.sft import SFTConfig, run_sft
from alignlab.core.config import DataSection, EvalSection, ModelSection, TrainSection, WorldSection
from alignlab.eval.evaluate import evaluate
from alignlab.models.loading import load_model, load_tokenizer

EVAL = EvalSection(n_prompts=48, samples_per_prompt=2, seed=11)


def _cfg(tiny_world, world_cache, tmp_path, **data) -> SFTConfig:
    return SFTConfig(
        model=ModelSection(name_or_path="world:base"),
        data=DataSection(source="world:positive", limit=1024, **data),
        train=TrainSection(output_dir=str(tmp_path), max_steps=40, batch_size=16, lr=1e-3,
                           warmup_steps=5, log_every=5, progress=False, tensorboard=False),
        world=WorldSection(preset="tiny", cache_dir=world_cache))


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_on_positive_demonstrations_raises_gold_sentiment(tiny_world, world_cache, tmp_path, packing):
    task = tiny_world.task("positive")
    base = load_model(str(tiny_world.base_dir))
    tok = load_tokenizer(str(tiny_world.base_dir))
    before = evaluate(base, tok, task, EVAL)["metrics"]["gold_mean"]
    run = run_sft(_cfg(tiny_world, world_cache, tmp_path, packing=packing))
    after_model = load_model(str(tmp_path / "final"))
    after = evaluate(after_model, tok, task, EVAL)["metrics"]["gold_mean"]
    assert after > before + 0.2, (before, after)
    losses = [h["loss"] for h in run.result.history]
    assert min(losses[-3:]) < losses[0]
    assert (tmp_path / "final" / "alignlab_config.yaml").exists()


def test_full_sequence_loss_trains_on_prompt_tokens_too(tiny_world, world_cache, tmp_path):
    from alignlab.algorithms.common import load_training_rows

    cfg = _cfg(tiny_world, world_cache, tmp_path, completion_only_loss=False)
    tok = load_tokenizer(str(tiny_world.base_dir))
    full = load_training_rows(cfg.data, cfg.world, tok).examples[0]
    cfg.data.completion_only_loss = True
    comp = load_training_rows(cfg.data, cfg.world, tok).examples[0]
    assert sum(full["loss_mask"]) == len(full["input_ids"]) - 1
    assert 0 < sum(comp["loss_mask"]) < sum(full["loss_mask"])


def test_sft_with_lora_trains_adapters_and_saves_a_merged_model(tiny_world, world_cache, tmp_path):
    from alignlab.core.config import LoraSettings

    cfg = _cfg(tiny_world, world_cache, tmp_path)
    cfg.model.lora = LoraSettings(r=4, alpha=8)
    cfg.train.max_steps = 5
    run = run_sft(cfg)
    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    merged = load_model(str(tmp_path / "final"))  # a plain causal LM: adapters merged on save
    base = load_model(str(tiny_world.base_dir))
    changed = [n for (n, a), b in zip(merged.state_dict().items(), base.state_dict().values())
               if not torch.equal(a, b)]
    assert changed and not any("lora" in n for n in merged.state_dict())
    # The adapters alone, in PEFT's layout, next to the merged model: loading them onto the
    # base gives the merged model's outputs.
    from peft import PeftModel

    adapter = tmp_path / "final" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").stat().st_size < 0.2 * (
        tmp_path / "final" / "model.safetensors").stat().st_size
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        want = merged(ids).logits
        peft = PeftModel.from_pretrained(load_model(str(tiny_world.base_dir)), str(adapter))
        peft.eval()
        torch.testing.assert_close(peft(ids).logits, want, rtol=1e-5, atol=1e-5)
        reloaded = load_model(str(adapter))  # alignlab reads the adapter directory too
        reloaded.eval()
        torch.testing.assert_close(reloaded(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert load_tokenizer(str(adapter)).vocab_size == load_tokenizer(str(tmp_path / "final")).vocab_size
