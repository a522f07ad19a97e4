"""Negative sampling for click logs that hold positives only (Taobao themes, Amazon reviews).

The seeds' rule (DESIGN.md section 2): for every domain draw ``ctr_ratio ~ U(0.2, 0.5)``, rounded
to 2 decimals; for every user of that domain with ``n_pos`` positive rows, sample
``int(n_pos / ctr_ratio)`` distinct negative items from the domain's item pool, excluding the
items the user clicked there (fewer when the pool runs out). As in the seeds' code, the pool of a
domain is the set of items that appear among its positives.

Vectorised rejection sampling: candidates for all users of a domain are drawn at once as
``user * pool_size + item`` keys, clicked and repeated keys are dropped, and the first draws per
user are kept; a user who needs more than half of the items left to them is served exactly by a
permutation of that complement instead (rejection would crawl there).
"""

from __future__ import annotations

import numpy as np

__all__ = ["CTR_RATIO_RANGE", "sample_negatives"]

CTR_RATIO_RANGE = (0.2, 0.5)


def _sample_domain(user: np.ndarray, item: np.ndarray, ratio: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pool = np.unique(item)
    m = int(pool.size)
    users, user_index, n_pos = np.unique(user, return_inverse=True, return_counts=True)
    clicked = np.unique(user_index.astype(np.int64) * m + np.searchsorted(pool, item))
    clicked_per_user = np.bincount(clicked // m, minlength=users.size)
    want = np.floor(n_pos / ratio + 1e-9).astype(np.int64)  # int(n_pos / ratio), float-safe
    need = np.minimum(want, m - clicked_per_user)
    picked: list[np.ndarray] = []

    dense = np.flatnonzero(need * 2 > m - clicked_per_user)
    for u in dense:
        if need[u] == 0:
            continue
        mine = clicked[(clicked >= u * m) & (clicked < (u + 1) * m)] - u * m
        free = np.setdiff1d(np.arange(m), mine, assume_unique=True)
        picked.append(u * m + rng.choice(free, size=int(need[u]), replace=False))
    need[dense] = 0

    taken = np.zeros(0, dtype=np.int64)
    while True:
        active = np.flatnonzero(need > 0)
        if active.size == 0:
            break
        owner = np.repeat(active, need[active] * 2 + 8)
        keys = owner * m + rng.integers(0, m, owner.size)
        keys = keys[~np.isin(keys, clicked) & ~np.isin(keys, taken)]
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]  # distinct, in draw order (still grouped by user)
        owner = keys // m
        starts = np.searchsorted(owner, owner, side="left")
        keep = keys[np.arange(keys.size) - starts < need[owner]]
        need -= np.bincount(keep // m, minlength=users.size)
        taken = np.concatenate([taken, keep])
        picked.append(keep)
    keys = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return users[keys // m], pool[keys % m]


def sample_negatives(
    user: np.ndarray,
    item: np.ndarray,
    domain: np.ndarray,
    num_domains: int,
    seed: int,
    ctr_range: tuple[float, float] = CTR_RATIO_RANGE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """Sample negatives for positive rows ``(user, item, domain)`` (``int64 [n]`` each).

    Returns ``(user, item, domain)`` of the negatives (``int64 [m]``, grouped by domain) and the
    ``ctr_ratio`` drawn for each domain. Deterministic given ``seed``.
    """
    rng = np.random.default_rng(seed)
    out_u, out_i, out_d, ratios = [], [], [], []
    for d in range(num_domains):
        ratio = round(float(rng.uniform(*ctr_range)), 2)
        ratios.append(ratio)
        rows = domain == d
        if not rows.any():
            continue
        u, i = _sample_domain(user[rows], item[rows], ratio, rng)
        out_u.append(u)
        out_i.append(i)
        out_d.append(np.full(u.size, d, dtype=np.int64))
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(out_u) if out_u else empty, np.concatenate(out_i) if out_i else empty,
            np.concatenate(out_d) if out_d else empty, ratios)
