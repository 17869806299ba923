"""LiPO-λ, PRO and the preference-degree loss: values by hand and ordering."""

import math

import pytest
import torch

from alignlab.losses.preference import PREFERENCE_LOSSES, PreferenceInputs


def ls(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def run(name, inputs, **kw):
    return PREFERENCE_LOSSES.get(name)(inputs, **kw)


def test_lipo_lambda_two_items():
    inputs = PreferenceInputs(list_logps=t(-3.0, -5.0)[None], ref_list_logps=t(-4.0, -4.5)[None],
                              scores=t(1.0, 0.0)[None])
    # s = [0.1, −0.05]: ranks [1, 2]; Δ = (2¹ − 1 − 0)·|1/log2(2) − 1/log2(3)|
    delta = 1.0 * abs(1 - 1 / math.log2(3))
    assert run("lipo_lambda", inputs).losses.item() == pytest.approx(-delta * ls(0.15))


def test_lipo_lambda_padding_items_are_ignored():
    full = PreferenceInputs(list_logps=t(-3.0, -5.0)[None], ref_list_logps=t(-4.0, -4.5)[None],
                            scores=t(1.0, 0.0)[None])
    padded = PreferenceInputs(list_logps=t(-3.0, -5.0, 0.0)[None],
                              ref_list_logps=t(-4.0, -4.5, 0.0)[None], scores=t(1.0, 0.0, 9.0)[None],
                              list_mask=torch.tensor([[True, True, False]]))
    expected = run("lipo_lambda", full).losses.item()
    assert run("lipo_lambda", padded).losses.item() == pytest.approx(expected)


def test_pro_two_items_without_temperature():
    inputs = PreferenceInputs(list_logps=t(-5.0, -3.0)[None], scores=t(0.0, 1.0)[None],
                              list_lengths=torch.tensor([[5, 2]]))
    r_best, r_worst = -1.5, -1.0
    expected = math.log1p(math.exp(r_worst - r_best)) + 0.05 * 1.5
    assert run("pro", inputs, dynamic_temperature=False).losses.item() == pytest.approx(expected)


def test_pro_three_items_dynamic_temperature():
    # given out of order; by score: item1 (3) ≻ item2 (1) ≻ item0 (0)
    inputs = PreferenceInputs(list_logps=t(-2.0, -1.0, -3.0)[None], scores=t(0.0, 3.0, 1.0)[None],
                              list_lengths=torch.tensor([[1, 1, 1]]))
    r0, r1, r2 = -1.0, -3.0, -2.0  # ranked order
    lse = lambda *x: math.log(sum(math.exp(v) for v in x))  # noqa: E731
    term0 = -(3 * r0 - lse(3 * r0, 2 * r1, 3 * r2))
    term1 = -(r1 - lse(r1, r2))
    assert run("pro", inputs, sft_weight=0.0).losses.item() == pytest.approx(term0 + term1)


def test_spo_degree_value():
    inputs = PreferenceInputs(list_logps=t(-3.0, -5.0)[None], ref_list_logps=t(-4.0, -4.5)[None],
                              scores=t(1.0, 0.0)[None])
    q1 = 1 / (1 + math.exp(-1.0))
    log_p1, log_p2 = ls(0.15), ls(-0.15)  # log softmax of [0.1, −0.05]
    assert run("spo_degree", inputs).losses.item() == pytest.approx(-(q1 * log_p1 + (1 - q1) * log_p2))


@pytest.mark.parametrize("name", ["lipo_lambda", "pro", "spo_degree"])
def test_better_ranked_items_are_pushed_up(name):
    logps = torch.full((1, 4), -4.0, dtype=torch.float64, requires_grad=True)
    ref = torch.full((1, 4), -4.0, dtype=torch.float64)
    inputs = PreferenceInputs(list_logps=logps, ref_list_logps=ref,
                              scores=t(0.0, 3.0, 1.0, 2.0)[None], list_lengths=torch.full((1, 4), 4))
    run(name, inputs).losses.sum().backward()
    g = logps.grad[0]
    assert g[1] < 0 and g[0] > 0  # best up, worst down
    assert g[1] < g[3] < g[2] < g[0]  # the push follows the ranking (scores 3 > 2 > 1 > 0)


@pytest.mark.parametrize("name", ["lipo_lambda", "pro", "spo_degree"])
def test_padded_lists_have_finite_gradients(name):
    logps = torch.tensor([[-3.0, -5.0, 0.0, 0.0], [-2.0, -4.0, -6.0, -1.0]], requires_grad=True)
    inputs = PreferenceInputs(list_logps=logps, ref_list_logps=torch.full((2, 4), -4.0),
                              scores=torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 3.0, 2.0, 1.0]]),
                              list_lengths=torch.full((2, 4), 2),
                              list_mask=torch.tensor([[True, True, False, False], [True] * 4]))
    result = run(name, inputs)
    result.losses.sum().backward()
    assert torch.isfinite(result.losses).all() and torch.isfinite(logps.grad).all()
    assert (logps.grad[0, 2:] == 0).all()  # padding items get no gradient
