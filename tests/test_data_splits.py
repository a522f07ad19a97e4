"""The per-domain, label-stratified 60/20/20 split."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moefast.data.splits import assign_splits


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    seed=st.integers(0, 2**31),
)
def test_every_domain_label_group_is_cut_60_20_20(sizes: list[int], seed: int) -> None:
    # Groups of any size, including empty and single-row ones.
    domain = np.repeat(np.arange(len(sizes)) // 2, sizes)
    label = np.repeat(np.arange(len(sizes)) % 2, sizes).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(domain))
    domain, label = domain[perm], label[perm]
    part = assign_splits(domain, label, seed=seed)
    assert part.shape == domain.shape and set(np.unique(part)) <= {0, 1, 2}
    for g, m in enumerate(sizes):
        rows = (domain == g // 2) & (label == g % 2)
        got = np.bincount(part[rows], minlength=3).tolist()
        a, b = math.floor(0.6 * m + 0.5), math.floor(0.8 * m + 0.5)
        assert got == [a, b - a, m - b]


def test_seed_decides_the_assignment() -> None:
    domain = np.zeros(1_000, dtype=np.int64)
    label = np.zeros(1_000, dtype=np.float32)
    a, b = assign_splits(domain, label, seed=123), assign_splits(domain, label, seed=123)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, assign_splits(domain, label, seed=124))


def test_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match=r"0\.5"):
        assign_splits(np.zeros(3, dtype=np.int64), np.zeros(3), fractions=(0.5, 0.2, 0.2))
