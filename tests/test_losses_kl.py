import math

import pytest
import torch

from alignlab.core.errors import ConfigError
from alignlab.losses.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3, token_kl

P = torch.tensor([0.5, 0.3, 0.2])
Q = torch.tensor([0.2, 0.5, 0.3])


def exact_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


def test_k1_and_k3_are_unbiased_for_samples_from_p():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(P, 200_000, replacement=True, generator=gen)
    logp, logq = P.log()[tokens], Q.log()[tokens]
    kl = exact_kl(P, Q)  # 0.5 ln 2.5 + 0.3 ln 0.6 + 0.2 ln(2/3) ≈ 0.2240
    assert kl == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(0.6) + 0.2 * math.log(2 / 3))
    assert float(kl_k1(logp, logq).mean()) == pytest.approx(kl, abs=0.01)
    assert float(kl_k3(logp, logq).mean()) == pytest.approx(kl, abs=0.01)
    # k1 is negative on some tokens, k3 never.
    assert float(kl_k1(logp, logq).min()) < 0
    assert float(kl_k3(logp, logq).min()) >= 0


def test_k3_is_nonnegative_and_finite_even_for_extreme_log_ratios():
    gen = torch.Generator().manual_seed(1)
    logp = torch.randn(1000, generator=gen) * 30
    logq = torch.randn(1000, generator=gen) * 30
    k3 = kl_k3(logp, logq)
    assert bool((k3 >= 0).all()) and bool(torch.isfinite(k3).all())
    assert bool(torch.isfinite(kl_k3(torch.tensor([0.0]), torch.tensor([1e4]))).all())


def test_k2_matches_kl_for_close_distributions():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.48, 0.31, 0.21])
    expected_k2 = float((p * kl_k2(p.log(), q.log())).sum())  # exact expectation under p
    assert expected_k2 == pytest.approx(exact_kl(p, q), rel=0.05)


def test_estimators_are_zero_when_logprobs_agree_and_mask_zeros():
    x = torch.tensor([[-1.0, -2.0, 0.0]])
    for name in ("k1", "k2", "k3"):
        assert torch.equal(token_kl(x, x, name), torch.zeros_like(x))
    masked = token_kl(torch.tensor([[-1.0, -3.0]]), torch.tensor([[-2.0, -1.0]]), "k1",
                      torch.tensor([[1, 0]]))
    assert masked.tolist() == [[1.0, 0.0]]


def test_registry_names_and_aliases():
    assert {"k1", "k2", "k3", "kl", "mse", "low_var_kl"} <= set(KL_ESTIMATORS.names())
    assert KL_ESTIMATORS.get("low_var_kl") is kl_k3
    with pytest.raises(ConfigError, match="k3"):
        KL_ESTIMATORS.get("k4")
