"""BatchLoader: the method's domain-by-domain order, mixed and sequential batches."""

from __future__ import annotations

import pytest
import torch

from moefast.data import BatchLoader, BatchOrder, Split


def _split(n: int = 1_000, domains: int = 5, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    domain = torch.randint(0, domains, (n,), generator=g)
    # `row` identifies each row, so every batch can be checked against the split's columns.
    features = {"row": torch.arange(n), "bag": torch.randint(0, 9, (n, 3), generator=g)}
    return Split(features, domain, torch.randint(0, 2, (n,), generator=g).float())


def _check_rows(split: Split, batches: list) -> torch.Tensor:  # type: ignore[type-arg]
    rows = torch.cat([b.features["row"] for b in batches]) if batches else torch.zeros(0, dtype=torch.int64)
    for b in batches:
        r = b.features["row"]
        assert torch.equal(b.domain, split.domain[r]) and torch.equal(b.label, split.label[r])
        assert torch.equal(b.features["bag"], split.features["bag"][r])
    return rows


def test_by_domain_batches_are_single_domain_and_domains_run_one_after_another() -> None:
    split = _split()
    loader = BatchLoader(split, 64, generator=3)
    orders = []
    for _ in range(6):
        batches = list(loader)
        assert len(batches) == len(loader)
        rows = _check_rows(split, batches)
        assert torch.equal(torch.sort(rows).values, torch.arange(len(split)))  # each row once
        seq = [int(b.domain[0]) for b in batches]
        assert all(torch.all(b.domain == b.domain[0]) for b in batches)
        visit = [d for i, d in enumerate(seq) if i == 0 or d != seq[i - 1]]
        assert sorted(visit) == list(range(5))  # contiguous: each domain visited once
        orders.append(tuple(visit))
    # The order of domains is reshuffled every epoch.
    assert len(set(orders)) > 1


def test_mixed_batches_mix_domains_and_cover_every_row() -> None:
    split = _split()
    batches = list(BatchLoader(split, 100, BatchOrder.MIXED, generator=1))
    rows = _check_rows(split, batches)
    assert torch.equal(torch.sort(rows).values, torch.arange(len(split)))
    assert not torch.equal(rows, torch.arange(len(split)))
    assert any(len(torch.unique(b.domain)) > 1 for b in batches)


def test_sequential_keeps_stored_order() -> None:
    split = _split(n=1_001)
    batches = list(BatchLoader(split, 100, BatchOrder.SEQUENTIAL))
    assert [len(b) for b in batches] == [100] * 10 + [1]
    assert torch.equal(_check_rows(split, batches), torch.arange(1_001))


@pytest.mark.parametrize("order", list(BatchOrder))
def test_domain_subset_visits_only_those_domains(order: BatchOrder) -> None:
    split = _split()
    batches = list(BatchLoader(split, 32, order, domains=[3, 1], generator=0))
    rows = _check_rows(split, batches)
    want = torch.nonzero((split.domain == 1) | (split.domain == 3)).flatten()
    assert torch.equal(torch.sort(rows).values, want)


def test_same_seed_same_epochs_and_epochs_differ() -> None:
    split = _split()
    a, b = BatchLoader(split, 50, generator=9), BatchLoader(split, 50, generator=torch.Generator().manual_seed(9))
    first_a, first_b = [x.features["row"] for x in a], [x.features["row"] for x in b]
    assert all(torch.equal(x, y) for x, y in zip(first_a, first_b, strict=True))
    second_a = [x.features["row"] for x in a]
    assert not all(torch.equal(x, y) for x, y in zip(first_a, second_a, strict=False))


def test_drop_last_and_len() -> None:
    split = _split(n=999)
    counts = torch.bincount(split.domain, minlength=5).tolist()
    loader = BatchLoader(split, 64, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == sum(c // 64 for c in counts)
    assert all(len(b) == 64 for b in batches)
    assert len(BatchLoader(split, 64)) == sum(-(-c // 64) for c in counts)
    assert len(BatchLoader(split, 64, BatchOrder.MIXED, drop_last=True)) == 999 // 64


def test_awkward_inputs() -> None:
    # A requested domain with no rows contributes nothing; an empty split yields no batches.
    split = _split()
    assert list(BatchLoader(split, 16, domains=[7])) == []
    empty = Split({"row": torch.zeros(0, dtype=torch.int64)}, torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    for order in BatchOrder:
        assert list(BatchLoader(empty, 16, order)) == []
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(split, 0)
    with pytest.raises(TypeError, match="order"):
        BatchLoader(split, 8, "mixed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="-1"):
        BatchLoader(split, 8, domains=[-1])
