"""Means over seeds with a 95% Student-t interval: ``x̄ ± t_{0.975, k−1} · s / √k`` (``s`` the
sample standard deviation of the ``k`` seeds' values)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# t_{0.975, df} for df = 1..30 (standard tables); larger df use the next smaller tabulated df
# (40, 60, 120), which errs on the wide side, and the normal 1.960 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_T975_TAIL = ((120, 1.980), (60, 2.000), (40, 2.021), (30, 2.042))


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (tabulated)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    if df > 1000:
        return 1.960
    return next(t for d, t in _T975_TAIL if df >= d)


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float
    """Of the 95% t-interval; NaN with fewer than two values."""
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and 95% t-interval of ``values`` (NaN values are left out)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return Interval(math.nan, math.nan, 0)
    if len(xs) == 1:
        return Interval(xs[0], math.nan, 1)
    k = len(xs)
    return Interval(statistics.fmean(xs), t_quantile_975(k - 1) * statistics.stdev(xs) / math.sqrt(k), k)
