"""Negative sampling: the seeds' counts, exclusions and pools, exactly."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from moefast.data.negatives import sample_negatives


@pytest.mark.parametrize(("users", "items", "rows"), [
    (300, 500, 3_000),  # sparse: rejection sampling
    (5, 6, 25),  # dense: most users need more than half of what is left to them
    (1, 1, 3),  # a one-item pool: nothing left to sample
])
def test_counts_exclusions_and_pools(users: int, items: int, rows: int) -> None:
    rng = np.random.default_rng(users)
    u, i, d = rng.integers(0, users, rows), rng.integers(0, items, rows), rng.integers(0, 3, rows)
    nu, ni, nd, ratios = sample_negatives(u, i, d, 3, seed=5)
    assert all(0.2 <= r <= 0.5 and round(r, 2) == r for r in ratios)
    negatives = list(zip(nu.tolist(), ni.tolist(), nd.tolist(), strict=True))
    assert len(set(negatives)) == len(negatives)  # distinct
    got = Counter((a, c) for a, _, c in negatives)
    for dom in range(3):
        rows_d = d == dom
        pool = set(i[rows_d].tolist())
        for user in set(u[rows_d].tolist()):
            mine = rows_d & (u == user)
            clicked = set(i[mine].tolist())
            want = min(int(mine.sum() / ratios[dom] + 1e-9), len(pool - clicked))
            assert got[(user, dom)] == want, (user, dom)
            drawn = {b for a, b, c in negatives if a == user and c == dom}
            assert drawn <= pool - clicked


def test_deterministic_by_seed() -> None:
    rng = np.random.default_rng(0)
    u, i, d = rng.integers(0, 50, 500), rng.integers(0, 80, 500), rng.integers(0, 2, 500)
    a, b, c = (sample_negatives(u, i, d, 2, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3], strict=True)) and a[3] == b[3]
    assert not all(np.array_equal(x, y) for x, y in zip(a[:3], c[:3], strict=True))
