"""The rollout-correction registry (``losses/rollout_correction.py``) by value on a hand-made
batch: the importance weights π_old/π_rollout that correct a sampler's (or a stale policy's)
samples, truncated or masked, per token or per sequence, and their metrics."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.core.errors import ConfigError
from alignlab.losses.rollout_correction import (
    ROLLOUT_CORRECTIONS,
    RolloutCorrection,
    masked_weights,
    rollout_correction,
    truncated_weights,
)

# ρ = π_old/π_rollout = [[0.5, 1, 4], [3, 1, ·]]: the last token of row 1 is padding
RHO = torch.tensor([[0.5, 1.0, 4.0], [3.0, 1.0, 7.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
OLD = torch.full((2, 3), -1.0, dtype=torch.float64)
ROLLOUT = OLD - RHO.log()


def _metrics(m):
    return {k.removeprefix("rollout_is/"): pytest.approx(float(v)) for k, v in m.items()}


def test_truncated_weights_cap_the_ratio_at_c():
    w, m = rollout_correction(OLD, ROLLOUT, MASK, RolloutCorrection("tis", high=2.0))
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.0, 2.0], [2.0, 1.0, 0.0]],
                                               dtype=torch.float64))
    assert _metrics(m) == {
        "abs_logp_diff_mean": (math.log(2) + math.log(4) + math.log(3)) / 5,
        "abs_logp_diff_max": math.log(4),
        "ratio_mean": (0.5 + 1 + 4 + 3 + 1) / 5, "ratio_max": 4.0,
        "weight_mean": (0.5 + 1 + 2 + 2 + 1) / 5, "truncated_fraction": 2 / 5}
    assert not w.requires_grad


def test_masked_weights_drop_tokens_outside_the_band():
    w, m = rollout_correction(OLD, ROLLOUT, MASK, RolloutCorrection("masked", low=0.5, high=2.0))
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.0, 0.0], [0.0, 1.0, 0.0]],
                                               dtype=torch.float64))  # 0.5 is on the band
    assert float(m["rollout_is/masked_fraction"]) == pytest.approx(2 / 5)
    assert float(m["rollout_is/weight_mean"]) == pytest.approx(2.5 / 5)


def test_sequence_level_masking_drops_whole_completions():
    # row 0: ρ_seq = 0.5·1·4 = 2 ≤ 2.5 (kept, weight 2 on each token); row 1: 3·1 = 3, dropped
    w, m = rollout_correction(OLD, ROLLOUT, MASK,
                              RolloutCorrection("mis", level="sequence", high=2.5))
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]],
                                               dtype=torch.float64))
    assert float(m["rollout_is/ratio_mean"]) == pytest.approx((3 * 2 + 2 * 3) / 5)
    assert float(m["rollout_is/ratio_max"]) == pytest.approx(3.0)
    assert float(m["rollout_is/masked_fraction"]) == pytest.approx(2 / 5)


def test_the_registry_entries_and_their_aliases():
    assert ROLLOUT_CORRECTIONS.get("tis") is ROLLOUT_CORRECTIONS.get("truncated") is truncated_weights
    assert ROLLOUT_CORRECTIONS.get("mis") is ROLLOUT_CORRECTIONS.get("masked") is masked_weights
    log_rho = torch.tensor([math.log(0.25), 0.0, math.log(3.0)])
    torch.testing.assert_close(truncated_weights(log_rho, math.log(0.5), math.log(2.0)),
                               torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close(masked_weights(log_rho, math.log(0.5), math.log(2.0)),
                               torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(truncated_weights(log_rho, -math.inf, math.inf), log_rho.exp())
    with pytest.raises(ConfigError, match="unknown rollout correction mode 'icepop'.*masked"):
        rollout_correction(OLD, ROLLOUT, MASK, RolloutCorrection("icepop"))


def test_no_tokens_gives_zero_maxima():
    _, m = rollout_correction(OLD, ROLLOUT, torch.zeros(2, 3))
    assert float(m["rollout_is/ratio_max"]) == 0.0 and float(m["rollout_is/abs_logp_diff_max"]) == 0.0
