"""The reward trainer learns on the tiny world: chosen = positive review, rejected = negative."""

from __future__ import annotations

import json
import random

import pytest

from alignlab.algorithms.registry import ALGORITHMS
from alignlab.algorithms.reward_model.evaluate import evaluate_reward_model
from alignlab.algorithms.reward_model.trainer import (
    EnsembleSection,
    RewardConfig,
    RewardSection,
    init_model,
    load_examples,
    run_reward,
    split_examples,
)
from alignlab.core.config import DataSection, TrainSection, WorldSection, load_config
from alignlab.core.errors import ConfigError, DataError
from alignlab.rewards.reward_model import RewardEnsemble
from alignlab.world import language as lang


def _cfg(world_cache, out, *, source="world:positive", limit=320, steps=30, **reward) -> RewardConfig:
    return RewardConfig(
        data=DataSection(source=str(source), limit=limit),
        train=TrainSection(output_dir=str(out), max_steps=steps, batch_size=16, lr=1e-3,
                           warmup_steps=3, log_every=5, progress=False, tensorboard=False),
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        reward=RewardSection(eval_fraction=0.2, **reward))


def _review_rows(tiny_world, n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """(prompt, [positive, mixed, negative] completions) on the positive task's train prompts."""
    texts = set(tiny_world.task("positive").train_prompts)
    prefixes = [p for p in lang.all_review_prefixes() if p.text in texts]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prefix = rng.choice(prefixes)
        rows.append((prefix.text, [lang.complete_review(rng, prefix, p=p) for p in (1.0, 0.5, 0.0)]))
    return rows


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bradley_terry_reaches_held_out_accuracy(tiny_world, world_cache, tmp_path):
    cfg = _cfg(world_cache, tmp_path, eval_every=15)
    from alignlab.models.loading import load_tokenizer
    from alignlab.world.resolve import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path, cfg.world)
    examples, pad_id, fmt = load_examples(cfg, load_tokenizer(path))
    _, held_out = split_examples(examples, cfg)
    untrained = evaluate_reward_model(RewardEnsemble([init_model(path, cfg, 0)]), held_out, fmt, pad_id)

    run = run_reward(cfg)
    assert run.metrics["accuracy"] >= 0.9, run.metrics  # measured 1.0 (untrained ≈ 0.5)
    assert untrained["accuracy"] < 0.8, untrained
    assert run.metrics["ece"] < 0.2
    assert run.metrics["chosen_reward_mean"] > run.metrics["rejected_reward_mean"]
    saved = json.loads((tmp_path / "reward_eval.json").read_text())
    assert saved["metrics"]["accuracy"] == run.metrics["accuracy"] and saved["eval_examples"] == 64
    logged = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [15, 30, 30] and all("ece" in r for r in logged)
    assert not (tmp_path / "final" / "scalar_head.safetensors").exists()
    assert (tmp_path / "final" / "model.safetensors").exists()  # a sequence-classification checkpoint
    assert (tmp_path / "final" / "alignlab_config.yaml").exists()


def test_margin_loss_with_centering_keeps_rewards_centred(tiny_world, world_cache, tmp_path):
    def centre(m):
        return abs(m["chosen_reward_mean"] + m["rejected_reward_mean"]) / 2

    plain = run_reward(_cfg(world_cache, tmp_path / "plain", loss="bradley_terry_margin")).metrics
    centred = run_reward(_cfg(world_cache, tmp_path / "centred", loss="bradley_terry_margin",
                              center_coef=0.1)).metrics
    # measured (world v2): accuracy 0.98 plain, 0.89 centred; mean reward 0.12 from 0 in both.
    # Without centering the head has no bias (a pairwise loss cannot identify one; with a bias,
    # Adam random-walked it), so neither offset drifts.
    assert plain["accuracy"] >= 0.85 and centred["accuracy"] >= 0.85, (plain, centred)
    assert centre(centred) < 0.25 and centre(plain) < 0.25, (plain, centred)


def test_plackett_luce_on_ranked_lists(tiny_world, world_cache, tmp_path):
    rows = [{"prompt": p, "completions": c, "scores": [2.0, 1.0, 0.0]} for p, c in _review_rows(tiny_world, 240)]
    run = run_reward(_cfg(world_cache, tmp_path / "run", source=_jsonl(tmp_path / "ranked.jsonl", rows),
                          limit=None, loss="plackett_luce"))
    assert run.metrics["pairs"] == 48 * 3  # three ordered pairs per held-out list
    assert run.metrics["accuracy"] >= 0.8, run.metrics


def test_mse_on_scored_completions(tiny_world, world_cache, tmp_path):
    rows = [{"prompt": p, "completion": c, "score": s}
            for p, cs in _review_rows(tiny_world, 160) for c, s in zip(cs[::2], (1.0, -1.0))]
    run = run_reward(_cfg(world_cache, tmp_path / "run", source=_jsonl(tmp_path / "scored.jsonl", rows),
                          limit=None, steps=60, loss="mse"))
    assert run.metrics["accuracy"] >= 0.8, run.metrics
    assert run.metrics["mse"] < 0.6, run.metrics  # predicting 0 everywhere gives 1.0


def test_ensemble_members_and_heads_train_on_their_own_subsets(tiny_world, world_cache, tmp_path):
    ens = EnsembleSection(members=2, num_heads=2, subsample=0.5, aggregate="min")
    cfg = _cfg(world_cache, tmp_path, limit=160, steps=6, ensemble=ens)
    run = run_reward(cfg)
    assert run.model.size == 4 and run.metrics["pairs"] == 32
    assert {f"member_{k}_accuracy" for k in range(4)} <= set(run.metrics)
    assert (tmp_path / "member_1" / "metrics.jsonl").exists() and (tmp_path / "DONE").exists()
    loaded = RewardEnsemble.from_pretrained(tmp_path / "final")
    assert loaded.size == 4 and loaded.aggregate == "min"
    train, _ = split_examples([{"i": i} for i in range(400)], cfg)
    masks = [t["member_mask"] for t in train]
    share = [sum(m[k] for m in masks) / len(masks) for k in range(4)]
    assert all(0.4 < s < 0.6 for s in share), share
    assert masks != [[m[0]] * 4 for m in masks]  # the columns see different examples


def _random_examples(fmt: str, n: int = 8, k: int = 2) -> list[dict]:
    g = random.Random(0)

    def ids(lo, hi):
        return [g.randrange(1, 64) for _ in range(g.randint(lo, hi))]

    out = []
    for i in range(n):
        mask = [float(g.random() < 0.7) for _ in range(k)]
        if fmt == "preference":
            out.append({"prompt_ids": ids(2, 5), "chosen_ids": ids(1, 6), "rejected_ids": ids(1, 6),
                        "margin": 0.1 * i, "member_mask": mask})
        else:  # ragged ranked lists
            m = 2 + i % 3
            out.append({"prompt_ids": ids(2, 5), "completion_ids": [ids(1, 6) for _ in range(m)],
                        "scores": [g.random() for _ in range(m)], "member_mask": mask})
    return out


@pytest.mark.parametrize("fmt,loss", [("preference", "bradley_terry_margin"), ("ranked", "plackett_luce")])
def test_packed_equals_padded_and_accumulation_is_exact(fmt, loss):
    import torch

    from alignlab.algorithms.reward_model.batches import collate
    from alignlab.algorithms.reward_model.trainer import RewardObjective
    from alignlab.engine.loop import forward_backward
    from alignlab.models.heads import CausalLMWithScalarHead

    from tests.conftest import random_llama

    model = CausalLMWithScalarHead(random_llama(), num_heads=2)
    objective = RewardObjective(loss, center_coef=0.05)
    examples = _random_examples(fmt)
    padded, packed = (collate(examples, fmt, 0, packed=p, columns=[0, 1]) for p in (False, True))
    with torch.no_grad():
        per_padded = objective.per_example(model.sequence_values(padded), padded)
        per_packed = objective.per_example(model.sequence_values(packed), packed)
    torch.testing.assert_close(per_padded, per_packed, atol=1e-5, rtol=1e-5)

    def grads(micro):
        model.zero_grad()
        loss_value, denom, _ = forward_backward(model, objective, micro, torch.device("cpu"))
        return loss_value, denom, torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = grads([padded])
    split = grads([collate(examples[:3], fmt, 0, columns=[0, 1]),
                   collate(examples[3:], fmt, 0, columns=[0, 1])])
    assert whole[1] == split[1] == sum(sum(e["member_mask"]) for e in examples) / 2
    assert whole[0] == pytest.approx(split[0], rel=1e-5)
    torch.testing.assert_close(whole[2], split[2], atol=1e-6, rtol=1e-4)


def test_bad_score_names_file_line_and_field(tiny_world, world_cache, tmp_path):
    rows = [{"prompt": "review of x :", "completion": " good .", "score": 1.0},
            {"prompt": "review of x :", "completion": " bad .", "score": "high"}]
    source = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'score': must be a finite number"):
        run_reward(_cfg(world_cache, tmp_path / "run", source=source, limit=None, loss="mse"))
    with pytest.raises(ConfigError, match="'prompt_completion' but reward.loss 'bradley_terry'"):
        run_reward(_cfg(world_cache, tmp_path / "run", source=source, limit=None))


def test_tied_pairs_are_skipped_and_margins_kept(tiny_world, world_cache, tmp_path):
    from alignlab.models.loading import load_tokenizer

    rows = [{"prompt": "review of x :", "chosen": " good .", "rejected": " bad .", "margin": 0.5 * i,
             "tie": i == 1} for i in range(3)]
    cfg = _cfg(world_cache, tmp_path, source=_jsonl(tmp_path / "ties.jsonl", rows), limit=None)
    examples, _, fmt = load_examples(cfg, load_tokenizer(str(tiny_world.base_dir)))
    assert fmt == "preference" and [e["margin"] for e in examples] == [0.0, 1.0]


def test_config_rejects_unknown_loss_and_is_registered(tmp_path):
    bad = tmp_path / "rm.yaml"
    bad.write_text("reward:\n  loss: hinge\n")
    with pytest.raises(ConfigError, match=r"field 'reward.loss'.*allowed values: bradley_terry"):
        load_config(RewardConfig, bad)
    assert ALGORITHMS.get("reward").config_cls is RewardConfig


def test_trained_reward_model_is_a_portable_sequence_classifier(tiny_world, world_cache, tmp_path):
    """Issue 15: ``final/`` loads with AutoModelForSequenceClassification, nothing missing, and
    scores exactly what alignlab's scorer does (an ensemble of 2 heads: one label per head)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignlab.data.collate import pad_collate
    from alignlab.data.loading import RowSet
    from alignlab.data.tokenize import tokenize_rows
    from alignlab.rewards.reward_model import RewardModelScorer, scored_completion

    run = run_reward(_cfg(world_cache, tmp_path, limit=64, steps=3,
                          ensemble=EnsembleSection(num_heads=2)))
    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        run.final_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert classifier.config.num_labels == 2
    assert classifier.config.pad_token_id == run.tokenizer.pad_token_id
    scorer = RewardModelScorer.from_pretrained(run.final_dir)
    prompts, completions = ["The film was", "The food was"], [" great. END", " awful and cold. END"]
    ours = torch.tensor(scorer.score(prompts, completions).members)
    rows = RowSet("prompt_completion", [{"prompt": p, "completion": scored_completion(c)}
                                        for p, c in zip(prompts, completions)], "<t>")
    tok = tokenize_rows(rows, scorer.tokenizer, max_length=512, truncation="keep_end_of_prompt")
    batch = pad_collate(tok.examples, tok.pad_token_id)
    with torch.no_grad():
        hf = classifier.eval()(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(hf, ours, atol=1e-5, rtol=1e-5)
