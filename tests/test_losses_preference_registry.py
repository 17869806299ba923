"""Registry contents, missing-field errors, gradient directions of every paired loss, combine."""

import re

import pytest
import torch

from alignlab.core.errors import ConfigError
from alignlab.losses.preference import (
    PREFERENCE_LOSSES,
    MissingInputError,
    PreferenceInputs,
    combine_losses,
    loss_spec,
)

DISTINCT = sorted({loss_spec(n).name for n in PREFERENCE_LOSSES.names()})
PAIRED = [n for n in DISTINCT if loss_spec(n).kind == "paired"]


def paired_inputs(requires_grad=True):
    """Every paired field filled, at the neutral point π = ref and π_c = π_r."""
    base = torch.tensor([-8.0, -10.0, -12.0], dtype=torch.float64)
    chosen = base.clone().requires_grad_(requires_grad)
    rejected = base.clone().requires_grad_(requires_grad)
    tokens = torch.tensor([[-2.0, -3.0, -3.0]] * 3, dtype=torch.float64)
    return PreferenceInputs(
        chosen_logps=chosen, rejected_logps=rejected, ref_chosen_logps=base.clone(),
        ref_rejected_logps=base.clone(), chosen_lengths=torch.tensor([4, 5, 6]),
        rejected_lengths=torch.tensor([4, 5, 6]), margin=torch.ones(3, dtype=torch.float64),
        ties=torch.zeros(3, dtype=torch.bool), groups=torch.tensor([0, 1, 0]),
        ref_chosen_logps_multi=base[:, None].repeat(1, 2),
        ref_rejected_logps_multi=base[:, None].repeat(1, 2),
        chosen_token_logps=tokens.clone().requires_grad_(requires_grad),
        rejected_token_logps=tokens.clone().requires_grad_(requires_grad),
        ref_chosen_token_logps=tokens.clone(), ref_rejected_token_logps=tokens.clone(),
        chosen_mask=torch.ones(3, 3), rejected_mask=torch.ones(3, 3))


def test_registry_has_many_unambiguous_losses():
    assert len(DISTINCT) >= 25
    for required in ("dpo", "cdpo", "rdpo_robust", "rdpo_length", "ipo", "hinge", "slic_hf", "simpo",
                     "orpo", "cpo", "kto", "bco_pair", "bco", "apo_zero", "apo_down", "nca_pair",
                     "exo_pair", "sppo_hard", "dpop", "wpo", "fdpo_reverse_kl", "fdpo_forward_kl",
                     "fdpo_js", "fdpo_alpha", "discopop", "aot_pair", "aot_paired",
                     "aot_unpaired_on_pairs", "aot_unpaired", "spo_degree", "lipo_lambda", "pro", "mmpo", "margin_matching", "sft", "sigmoid"):
        assert required in PREFERENCE_LOSSES
    for ambiguous in ("rdpo", "rpo", "spo", "apo", "aot", "fdpo"):
        assert ambiguous not in PREFERENCE_LOSSES


@pytest.mark.parametrize("name", DISTINCT)
def test_spec_is_consistent_and_documented(name):
    spec = loss_spec(name)
    assert spec.kind in ("paired", "unpaired", "listwise")
    assert spec.needs_reference == any(f.startswith("ref_") for f in spec.requires)
    doc = PREFERENCE_LOSSES.get(name).__doc__
    assert re.search(r"(19|20)\d\d", doc), f"{name}: docstring should cite its paper with a year"
    assert PREFERENCE_LOSSES.summary(name)


def test_missing_field_names_loss_and_field():
    inputs = PreferenceInputs(chosen_logps=torch.zeros(2), rejected_logps=torch.zeros(2))
    with pytest.raises(MissingInputError, match=r"'dpo'.*ref_chosen_logps, ref_rejected_logps") as err:
        PREFERENCE_LOSSES.get("dpo")(inputs)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, ValueError)
    with pytest.raises(MissingInputError, match=r"'simpo'.*chosen_lengths"):
        PREFERENCE_LOSSES.get("simpo")(inputs)
    with pytest.raises(MissingInputError, match=r"'kto'.*logps"):
        PREFERENCE_LOSSES.get("kto")(inputs)


def test_wrong_shape_is_reported():
    bad = PreferenceInputs(chosen_logps=torch.zeros(2, 3), rejected_logps=torch.zeros(2, 3),
                           ref_chosen_logps=torch.zeros(2, 3), ref_rejected_logps=torch.zeros(2, 3))
    with pytest.raises(MissingInputError, match="chosen_logps with 1 dimension"):
        PREFERENCE_LOSSES.get("dpo")(bad)


@pytest.mark.parametrize("name", PAIRED)
def test_gradient_raises_chosen_and_lowers_rejected(name):
    inputs = paired_inputs()
    if name == "discopop":  # non-convex near h = 0 (documented); check a wrongly ordered pair
        inputs.chosen_logps = (inputs.chosen_logps.detach() - 5.0).requires_grad_()
    result = PREFERENCE_LOSSES.get(name)(inputs)
    assert result.losses.shape == (3,) and torch.isfinite(result.losses).all()
    result.losses.sum().backward()
    if "chosen_token_logps" in loss_spec(name).requires:  # token-level: sparse_po, ld_dpo
        g_c, g_r = inputs.chosen_token_logps.grad, inputs.rejected_token_logps.grad
    else:
        g_c = inputs.chosen_logps.grad
        g_r = torch.zeros_like(g_c) if inputs.rejected_logps.grad is None else inputs.rejected_logps.grad
    if name == "sft":  # not a preference loss: only the chosen completion is trained
        assert (g_c < 0).all() and (g_r == 0).all()
    elif name == "apo_down":  # lowers both, the rejected one more: only the margin must grow
        assert (g_c - g_r < 0).all() and (g_r > 0).all()
    else:
        assert (g_c < 0).all() and (g_r > 0).all()


def test_combine_is_weighted_sum_with_routed_hyper_parameters():
    inputs = paired_inputs(requires_grad=False)
    inputs.chosen_logps = inputs.chosen_logps + 1.0  # a = 1, b = 0
    shift = 0.03
    got = combine_losses({"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}, inputs, beta=0.2,
                         per_loss={"bco_pair": {"reward_shift": shift}})
    get = PREFERENCE_LOSSES.get
    expected = (0.8 * get("sigmoid")(inputs, beta=0.2).losses
                + 0.2 * get("bco_pair")(inputs, beta=0.2, reward_shift=shift).losses
                + get("sft")(inputs).losses)
    assert torch.allclose(got.losses, expected)
    assert torch.allclose(got.chosen_rewards, 0.2 * torch.ones(3, dtype=torch.float64))
    assert {"sigmoid/loss", "bco_pair/loss", "sft/loss", "bco_pair/rewards/mean"} <= set(got.metrics)


def test_combine_errors():
    inputs = paired_inputs(requires_grad=False)
    with pytest.raises(ConfigError, match="gamma"):
        combine_losses({"dpo": 1.0, "sft": 1.0}, inputs, gamma=0.5)
    with pytest.raises(ConfigError, match="unknown preference loss 'rpo'"):
        combine_losses({"rpo": 1.0}, inputs)
    with pytest.raises(ConfigError, match="not in the weights"):
        combine_losses({"dpo": 1.0}, inputs, per_loss={"sft": {}})
