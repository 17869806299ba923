"""The preference trainer drives the losses that need more than sequence log-prob sums:
per-token log-ratios (sparse_po), several references (mrpo), ties (dpo_ties), annotator groups
(group_robust_dpo) and scalar rewards with a baseline (dro_pointwise). Each learns on the tiny
world in a few steps; missing columns and bad settings fail with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignlab.algorithms.preference.heldout import implicit_reward_accuracy
from alignlab.algorithms.preference.inputs import GroupWeights
from alignlab.algorithms.preference.reference import CACHE_FILE
from alignlab.algorithms.preference.trainer import (
    PreferenceConfig,
    PreferenceObjective,
    PreferenceSection,
    plan_losses,
    run_preference,
)
from alignlab.core.config import DataSection, TrainSection, WorldSection, load_config
from alignlab.core.errors import ConfigError, DataError
from alignlab.data.preference_batches import collate_groups
from alignlab.losses.preference import PREFERENCE_LOSSES, PreferenceInputs
from alignlab.models.loading import load_model
from alignlab.models.logprobs import completion_logprobs

from tests.conftest import heldout_pairs, random_llama


def _cfg(world_cache, out, loss, steps=20, source="world:positive", **pref) -> PreferenceConfig:
    return PreferenceConfig(
        data=DataSection(source=source, limit=256, max_length=96),
        train=TrainSection(output_dir=str(out), max_steps=steps, batch_size=8, lr=2e-4,
                           warmup_steps=3, log_every=5, progress=False, tensorboard=False),
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        preference=PreferenceSection(loss=loss, **pref))


@pytest.fixture(scope="module")
def eval_pairs(tiny_world):
    """Pairs on the task's eval prompts (all-positive vs all-negative) and the base model."""
    _, tok, base, examples = heldout_pairs(tiny_world)
    assert implicit_reward_accuracy(base, base, examples, tok.pad_token_id) == 0.0  # all ties
    return tok, base, examples


def _accuracy(run, eval_pairs) -> float:
    tok, base, pairs = eval_pairs
    return implicit_reward_accuracy(run.model, base, pairs, tok.pad_token_id)


def test_sparse_po_trains_on_cached_per_token_log_ratios(eval_pairs, world_cache, tmp_path):
    run = run_preference(_cfg(world_cache, tmp_path, "sparse_po"))
    assert run.layout == "shared"  # the one-pass prefix sharing keeps per-token log-probs
    ex = run.examples[0]
    n_c, n_r = len(ex["chosen_ids"]), len(ex["rejected_ids"])
    assert len(ex["ref_token_logps"]) == n_c + n_r
    assert ex["ref_logps"] == pytest.approx([sum(ex["ref_token_logps"][:n_c]),
                                             sum(ex["ref_token_logps"][n_c:])])
    assert (tmp_path / "reference_token_logps.safetensors").exists()
    assert _accuracy(run, eval_pairs) >= 0.8  # measured 0.89 (base: 0.0)


def test_sparse_po_objective_reads_per_token_inputs_and_equals_dpo_with_unit_weights():
    model = random_llama(seed=3).float()
    g = torch.Generator().manual_seed(0)
    r = lambda k: torch.randint(1, 64, (k,), generator=g).tolist()  # noqa: E731
    ex = [{"prompt_ids": r(3 + i), "chosen_ids": r(4), "rejected_ids": r(2 + i)} for i in range(3)]
    for e in ex:
        e["ref_token_logps"] = [-2.0 - 0.1 * t for t in range(len(e["chosen_ids"]) + len(e["rejected_ids"]))]
        e["ref_logps"] = [sum(e["ref_token_logps"][:4]), sum(e["ref_token_logps"][4:])]
    batch = collate_groups(ex, 0, layout="flat")
    assert batch["ref_token_logps"].shape == (6, 4) and batch["ref_token_logps"][3, 2] == 0.0  # padding
    sparse = PreferenceObjective(plan_losses(PreferenceSection(loss="sparse_po", beta=0.5)))
    dpo = PreferenceObjective(plan_losses(PreferenceSection(loss="dpo", beta=0.5)))
    got = sparse.loss(model, batch).loss_sum
    assert got.item() == pytest.approx(dpo.loss(model, batch).loss_sum.item(), abs=1e-5)
    got.backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    # Without precomputed values the reference model gives its per-token log-probs on the fly.
    ref_model = random_llama(seed=8).float()
    for e in ex:
        del e["ref_token_logps"], e["ref_logps"]
    bare = collate_groups(ex, 0, layout="flat")
    on_the_fly = PreferenceObjective(sparse.plan, ref_model).loss(model, bare).loss_sum
    assert on_the_fly.item() == pytest.approx(
        PreferenceObjective(dpo.plan, ref_model).loss(model, bare).loss_sum.item(), abs=1e-5)
    # The prefix-sharing layout gives the same per-token values and loss.
    shared = collate_groups(ex, 0, layout="shared")
    assert PreferenceObjective(sparse.plan, ref_model).loss(model, shared).loss_sum.item() == \
        pytest.approx(on_the_fly.item(), abs=1e-5)
    from alignlab.models.logprobs import completion_token_logprobs

    with torch.no_grad():
        assert torch.allclose(completion_token_logprobs(model, shared),
                              completion_token_logprobs(model, bare), atol=1e-5)


def test_mrpo_precomputes_and_stacks_several_references(eval_pairs, tiny_world, world_cache, tmp_path):
    other = load_model(str(tiny_world.base_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "ref2")
    refs = ["world:base", str(tmp_path / "ref2")]
    run = run_preference(_cfg(world_cache, tmp_path / "run", "mrpo", reference_models=refs))
    multi = torch.tensor([e["ref_logps_multi"] for e in run.examples])  # [B, 2 slots, M=2]
    assert multi.shape[1:] == (2, 2)
    assert torch.allclose(multi[..., 0], torch.tensor([e["ref_logps"] for e in run.examples]))
    assert (multi[..., 1] - multi[..., 0]).abs().mean() > 0.1  # the second reference differs
    assert (tmp_path / "run" / CACHE_FILE).exists()
    assert (tmp_path / "run" / "reference_logps.1.safetensors").exists()
    assert _accuracy(run, eval_pairs) >= 0.8  # measured 0.88
    again_cfg = _cfg(world_cache, tmp_path / "run", "mrpo", steps=1, reference_models=refs)
    again_cfg.train.overwrite = True  # a new run in the same directory: its caches are kept
    again = run_preference(again_cfg)
    assert again.reference_cache_hit is True  # both references read back from their caches


def _margins(run, examples) -> torch.Tensor:
    """Implicit reward margins (π_c − ref_c) − (π_r − ref_r) of training examples."""
    batch = collate_groups(examples, 0, layout="flat")
    with torch.no_grad():
        lr = completion_logprobs(run.model, batch) - batch["ref_logps"]
    b = len(examples)
    return lr[:b] - lr[b:]


def test_dpo_ties_pulls_tied_pairs_together_and_separates_the_rest(eval_pairs, world_cache, tmp_path):
    run = run_preference(_cfg(world_cache, tmp_path, "dpo_ties", steps=30))
    tied = [e for e in run.examples if e["tie"]]
    untied = [e for e in run.examples if not e["tie"]]
    assert 0.15 < len(tied) / len(run.examples) < 0.35
    assert "ties/fraction" in run.result.history[-1]
    tie_gap, win_gap = _margins(run, tied).abs().mean(), _margins(run, untied).mean()
    assert win_gap > 1.5 * tie_gap, (win_gap, tie_gap)  # measured 4.2 vs 1.8
    assert _accuracy(run, eval_pairs) >= 0.8  # measured 0.95


def test_group_robust_dpo_moves_weight_to_the_worse_group(eval_pairs, world_cache, tmp_path):
    cfg = _cfg(world_cache, tmp_path, "group_robust_dpo", steps=40, group_step_size=1.0)
    cfg.train.save_every = 40
    run = run_preference(cfg)
    last = run.result.history[-1]
    # "hard" pairs (0.75 vs 0.25 positivity, some mislabelled) keep a higher DPO loss.
    assert last["group_weight/hard"] > 0.6 > last["group_weight/easy"], last  # measured 0.81
    state = json.loads((tmp_path / "preference_state.json").read_text())
    assert state["group_weights"] == pytest.approx([last["group_weight/easy"], last["group_weight/hard"]], abs=1e-5)  # logged rounded
    assert _accuracy(run, eval_pairs) >= 0.8  # measured 0.95


def test_group_weights_are_importance_corrected_for_absent_groups():
    w = GroupWeights(["a", "b"], step_size=1.0, shares=[0.5, 0.5])
    w.update(torch.tensor([0.5, 0.0]), torch.tensor([0, 0]))  # b absent: its L̂ is 0, a's is 1
    assert w.weights.tolist() == pytest.approx([torch.e / (torch.e + 1), 1 / (torch.e + 1)])
    w = GroupWeights(["a", "b"], step_size=1.0, shares=[0.5, 0.5])
    w.update(torch.tensor([0.7, 0.7]), torch.tensor([0, 1]))  # equal losses: α stays uniform
    assert w.weights.tolist() == pytest.approx([0.5, 0.5])


def test_dro_regresses_log_ratios_onto_reward_advantages(eval_pairs, world_cache, tmp_path):
    run = run_preference(_cfg(world_cache, tmp_path, "dro_pointwise"))
    values = [e["value"] for e in run.examples]
    assert len(set(values)) > 10  # leave-one-out prompt means, not one constant
    assert all(v != e["reward"] for v, e in zip(values, run.examples))
    assert "dro/residual" in run.result.history[-1]
    assert _accuracy(run, eval_pairs) >= 0.75  # measured 0.88


def test_dro_objective_passes_rewards_and_values():
    model = random_llama(seed=4).float()
    g = torch.Generator().manual_seed(1)
    r = lambda k: torch.randint(1, 64, (k,), generator=g).tolist()  # noqa: E731
    ex = [{"prompt_ids": r(4), "completion_ids": r(3 + i), "reward": 0.5 * i, "value": 0.2,
           "ref_logps": [-15.0]} for i in range(3)]
    batch = collate_groups(ex, 0)
    out = PreferenceObjective(plan_losses(PreferenceSection(loss="dro_pointwise"))).loss(model, batch)
    with torch.no_grad():
        lp = completion_logprobs(model, batch)
    expected = PREFERENCE_LOSSES.get("dro_pointwise")(PreferenceInputs(
        logps=lp, ref_logps=batch["ref_logps"], rewards=torch.tensor([0.0, 0.5, 1.0]),
        values=torch.full((3,), 0.2)))
    assert out.loss_sum.item() == pytest.approx(expected.losses.sum().item(), abs=1e-5)


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PAIR = {"prompt": "the cafe was", "chosen": " lovely .", "rejected": " awful ."}


@pytest.mark.parametrize("loss,rows,error,match", [
    ("group_robust_dpo", [{**PAIR, "group": "a"}, PAIR], DataError,
     r"rows\.jsonl:2: field 'group': is missing \(loss group_robust_dpo needs it\)"),
    ("dpo_ties", [PAIR, PAIR], ConfigError, r"dpo_ties need\(s\) a 'tie' column .*rows\.jsonl"),
    ("dpo_ties", [{**PAIR, "tie": "yes"}], DataError, r"rows\.jsonl:1: field 'tie': must be true or false"),
    ("dro_pointwise", [{"prompt": "p", "completion": " c", "label": True}], DataError,
     r"rows\.jsonl:1: field 'reward': is missing \(loss dro_pointwise needs it\)"),
    ("kto", [{"prompt": "p", "completion": " c", "reward": 1.0},
             {"prompt": "p", "completion": " d", "reward": 0.0, "label": False}], DataError,
     r"rows\.jsonl:1: field 'label': is missing \(loss kto needs it\)"),
    ("mmpo", [{**PAIR, "margin": 1.0}, PAIR], DataError, r"rows\.jsonl:2: field 'margin': is missing"),
])
def test_missing_columns_name_file_line_and_field(world_cache, tmp_path, loss, rows, error, match):
    source = _write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(error, match=match):
        run_preference(_cfg(world_cache, tmp_path / "out", loss, source=source))


@pytest.mark.parametrize("section,fields", [
    (dict(loss="dpo", reference_models=["a", "b"]), ["preference.reference_models", "mrpo"]),
    (dict(loss="mrpo", reference_models=["a", "b"], loss_kwargs={"ref_weights": [1.0]}),
     ["preference.loss_kwargs.ref_weights", "2 reference_models"]),
    (dict(loss="mrpo", reference_models=["a", "b"], precompute_reference=False),
     ["preference.precompute_reference"]),
    (dict(loss="mrpo", reference="b", reference_models=["a", "b"]),
     ["preference.reference", "first"]),
])
def test_reference_model_settings_are_checked(section, fields):
    with pytest.raises(ConfigError) as err:
        plan_losses(PreferenceSection(**section))
    assert all(f in str(err.value) for f in fields), str(err.value)


def test_token_losses_refuse_prefix_sharing_off_sdpa_and_value_baseline_lists_choices(world_cache, tmp_path):
    cfg = _cfg(world_cache, tmp_path, "sparse_po", prefix_sharing=True)
    cfg.model.attn_implementation = "eager"  # per-token values share prefixes only on SDPA
    with pytest.raises(ConfigError, match="preference.prefix_sharing.*SDPA"):
        run_preference(cfg)
    with pytest.raises(ConfigError, match=r"preference\.value_baseline.*prompt_mean"):
        load_config(PreferenceConfig, None, ["preference.value_baseline=median"])
