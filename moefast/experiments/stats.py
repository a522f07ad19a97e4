"""The experiments' statistics: the grid's mean and spread over seeds, the claims' t-intervals.

One module, numpy in float64, so that the grid's table and the claims report summarise seeds by
the same arithmetic. A value that is ``None`` or NaN (a run without that number) is left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["mean_std", "t_interval"]

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def _kept(values: Iterable[float | None]) -> np.ndarray:
    return np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN std for a single value, NaN both for none)."""
    kept = _kept(values)
    if kept.size == 0:
        return math.nan, math.nan
    return float(kept.mean()), float(kept.std(ddof=1)) if kept.size > 1 else math.nan


def t_interval(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean and half-width of the 95% t-interval of ``values`` (NaN half-width below 2 values).
    Returns ``(mean, half_width, n)``."""
    kept = _kept(values)
    n = int(kept.size)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(kept[0]), math.nan, 1
    df = n - 1
    # Beyond the table, the Cornish-Fisher expansion z + (z^3 + z) / (4 df) (error < 1e-3).
    quantile = _T975[df - 1] if df <= len(_T975) else 1.95996 + (1.95996**3 + 1.95996) / (4 * df)
    return float(kept.mean()), quantile * float(kept.std(ddof=1)) / math.sqrt(n), n
